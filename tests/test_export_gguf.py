"""`yarnkit export --gguf`: a llama.cpp GGUF of a tiny YaRN Llama, read back by independent readers.

    python -m pytest tests/test_export_gguf.py -q

Checks: the YaRN keys under the exact names in `gguf.constants.Keys.Rope` (read with gguf.GGUFReader); YaRN that
llama.cpp's built-in one cannot run (betas other than 32/1, `truncate=false`) as per-pair frequency factors
(`rope_freqs.weight`, scaling type none, the attention factor as is); transformers' GGUF loader (which reverses
llama.cpp's tensor names and Q/K permutation, but ignores Llama's rope-scaling keys) gives the same logits once the
RoPE rebuilt from the metadata is installed: max |Δ| / max |logit| ≤ 1e-4 against the model with its weights
rounded as stored (every type), and the quantization error against the model itself ≤ 1e-6 (f32), 1e-2 (f16),
2e-2 (bf16), 5e-2 (q8_0); the tokenizer rebuilt from the GGUF encodes like the original. Real llama.cpp
(llama-cpp-python, built from source by `make install` in CI, where a missing build fails rather than skips)
loads the f32 and f16 files of three YaRN x4 models (attention factor 1.3; with it betas 8/2; with it an
untruncated ramp) and its logits on a prompt past the native context match transformers' (1e-5 and 2e-3;
measured below), and are far off with its rope scaling turned off or against the model with YaRN's default betas.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from export_fixtures import YARN, make_run, tiny_bpe_tokenizer, tiny_yarn_model  # noqa: E402

from yarnkit.export import verify  # noqa: E402
from yarnkit.export.cli import export  # noqa: E402
from yarnkit.errors import ExportError  # noqa: E402
from yarnkit.export.gguf import llama_cpp_rope, read_metadata, write_gguf  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_bpe_tokenizer()


CASES = {  # YaRN x4 (native 256 -> 1024), attention factor 1.3 (not 0.1 ln 4 + 1 = 1.139), and what varies:
    "yarn": {},  # llama.cpp's own YaRN: the rope.scaling keys
    "betas": {"beta_fast": 8.0, "beta_slow": 2.0},  # ramp over pairs 1..3 instead of 0..4 (head_dim 16)
    "untruncated": {"truncate": False},  # fractional ramp ends, as gpt-oss
}


def _export_case(root: Path, tokenizer, case: str):
    model = tiny_yarn_model(rope={**YARN, "attention_factor": 1.3, **CASES[case]})
    run = make_run(root, model, tokenizer, with_eval=False)
    report = export(run, root / "tiny", gguf=True, gguf_type="f16")
    return model, root / "tiny", report


@pytest.fixture(scope="module")
def gguf_export(tmp_path_factory, tokenizer):
    return _export_case(tmp_path_factory.mktemp("gguf"), tokenizer, "yarn")


@pytest.fixture(scope="module")
def gguf_exports(tmp_path_factory, tokenizer, gguf_export):
    """Every case of CASES exported (f16 GGUF, both checks on)."""
    exports = {"yarn": gguf_export}
    for case in CASES.keys() - {"yarn"}:
        exports[case] = _export_case(tmp_path_factory.mktemp(f"gguf-{case}"), tokenizer, case)
    return exports


def test_yarn_metadata_under_llama_cpp_key_names(gguf_export):
    from gguf.constants import Keys

    _, out, report = gguf_export
    meta = read_metadata(out / report["gguf_file"])
    key = {name: getattr(Keys.Rope, name).format(arch="llama") for name in
           ("SCALING_TYPE", "SCALING_FACTOR", "SCALING_ORIG_CTX_LEN", "SCALING_ATTN_FACTOR", "FREQ_BASE")}
    assert meta[key["SCALING_TYPE"]] == "yarn" and meta[key["SCALING_FACTOR"]] == 4.0
    assert meta[key["SCALING_ORIG_CTX_LEN"]] == 256 and meta["llama.context_length"] == 1024
    # llama.cpp multiplies its own 0.1 ln s + 1 by attn_factor; transformers' attention_factor replaces it
    assert meta[key["SCALING_ATTN_FACTOR"]] == pytest.approx(1.3 / (0.1 * math.log(4.0) + 1), rel=1e-6)
    assert not any("beta" in k for k in meta) and report["gguf_rope"] == "yarn"  # llama.cpp's built-in YaRN
    assert meta[key["FREQ_BASE"]] == 10000.0 and meta["tokenizer.ggml.model"] == "gpt2"
    assert "output.weight" in {t for t in _tensor_names(out / report["gguf_file"])}  # untied head kept
    assert "rope_freqs.weight" not in _tensor_names(out / report["gguf_file"])


@pytest.mark.parametrize("case", ["betas", "untruncated"])
def test_yarn_llama_cpp_cannot_run_goes_in_as_frequency_factors(gguf_exports, case):
    """llama.cpp's Llama loader reads no YaRN beta or truncate keys: such a YaRN is written as per-pair divisors of
    the base frequencies, scaling type none, and the attention factor itself (no 0.1 ln s + 1 is applied then)."""
    from gguf.constants import Keys

    model, out, report = gguf_exports[case]
    path = out / report["gguf_file"]
    meta = read_metadata(path)
    assert meta[Keys.Rope.SCALING_TYPE.format(arch="llama")] == "none" and report["gguf_rope"] == "freq_factors"
    assert meta[Keys.Rope.SCALING_ATTN_FACTOR.format(arch="llama")] == pytest.approx(1.3, rel=1e-6)
    assert not any("beta" in k or "scaling.factor" in k for k in meta)
    rope = llama_cpp_rope(path)
    assert rope["keys"]["frequency_factors"] == "rope_freqs.weight" and rope["context_length"] == 1024
    assert torch.allclose(rope["inv_freq"], model.model.rotary_emb.inv_freq.double(), rtol=1e-6, atol=0)
    assert any("per-pair frequency factors" in note for note in report["gguf_notes"])
    assert "do not pass" in (out / "README.md").read_text()  # the card warns against --rope-scaling on top
    assert report["gguf_check"]["passed"] and report["gguf_check"]["max_relative_difference"] <= 1e-4


def _tensor_names(path):
    import gguf

    return [t.name for t in gguf.GGUFReader(str(path)).tensors]


def test_transformers_gguf_loader_matches_with_metadata_rope(gguf_export):
    model, out, report = gguf_export
    check = report["gguf_check"]
    assert check["passed"] and check["max_relative_difference"] <= 1e-4 and check["prompt_tokens"] == 320
    assert 0 < check["quantization_error"] <= 1e-2  # f16 weights: measured ~7e-4
    rope = check["rope_from_metadata"]
    assert rope["scaling_type"] == "yarn" and rope["factor"] == 4.0 and rope["original_context_length"] == 256
    assert rope["attention_factor"] == pytest.approx(1.3, rel=1e-6)


def test_rope_metadata_matters(gguf_export, tokenizer):
    """transformers' GGUF loader alone ignores Llama's rope scaling: without the metadata RoPE the logits differ,
    so the comparison above really depends on the YaRN keys written."""
    from transformers import AutoModelForCausalLM

    model, out, report = gguf_export
    plain = AutoModelForCausalLM.from_pretrained(out, gguf_file=report["gguf_file"], dtype=torch.float32).eval()
    assert plain.config.rope_parameters["rope_type"] == "default"
    ids = verify.prompt_ids(tokenizer, 320, 384)
    with torch.no_grad():
        assert verify.max_relative_difference(model(ids).logits, plain(ids).logits) > 1e-2


def test_tokenizer_rebuilt_from_gguf_encodes_the_same(gguf_export, tokenizer):
    from transformers import AutoTokenizer

    _, out, report = gguf_export
    rebuilt = AutoTokenizer.from_pretrained(out, gguf_file=report["gguf_file"])
    text = "It was the best of times, it was the worst of times; 1848 <|im_end|>"
    assert rebuilt(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    meta = read_metadata(out / report["gguf_file"])
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id == 2
    assert meta["tokenizer.ggml.pre"] == "gpt-2"  # a plain byte-level pre-tokenizer splits with GPT-2's regex


@pytest.mark.parametrize("gguf_type", ["f32", "bf16", "q8_0"])
def test_other_gguf_types_round_trip(gguf_export, tmp_path, tokenizer, gguf_type):
    model, out, _ = gguf_export
    path = tmp_path / f"tiny-{gguf_type}.gguf"
    write_gguf(out, model, tokenizer, path, gguf_type)
    ids = verify.prompt_ids(tokenizer, 320, 384)
    result = verify.verify_gguf(path, model, ids, gguf_type)
    assert result["max_relative_difference"] <= 1e-4  # against the same rounded weights
    assert result["quantization_error"] <= {"f32": 1e-6, "bf16": 2e-2, "q8_0": 5e-2}[gguf_type]
    assert llama_cpp_rope(path)["context_length"] == 1024


def test_gguf_check_catches_a_wrong_rotary_layout(gguf_export, tmp_path, tokenizer, monkeypatch):
    """The check can fail: Q/K rows left in HF's layout (llama.cpp's permutation skipped) are detected."""
    from yarnkit.export import gguf as gguf_module

    model, out, _ = gguf_export
    monkeypatch.setattr(gguf_module, "_permute_rotary_rows", lambda weight, n_head: weight)
    path = tmp_path / "unpermuted.gguf"
    write_gguf(out, model, tokenizer, path, "f32")
    with pytest.raises(ExportError, match="layout or metadata is wrong"):
        verify.verify_gguf(path, model, verify.prompt_ids(tokenizer, 320, 384), "f32")


def test_refusals_name_the_reason(gguf_export, tmp_path, tokenizer):
    model, out, _ = gguf_export
    from conftest import tiny_model

    with pytest.raises(ExportError, match="Llama architecture only.*'qwen2'"):
        write_gguf(out, tiny_model("qwen2", vocab_size=384), tokenizer, tmp_path / "q.gguf")
    dynamic = tiny_yarn_model(rope={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(ExportError, match="rope_type 'dynamic' has no llama.cpp Llama equivalent — export without"):
        write_gguf(out, dynamic, tokenizer, tmp_path / "d.gguf")
    assert not (tmp_path / "d.gguf").exists()


def test_byte_level_detection_ignores_an_inert_byte_fallback():
    """transformers 5.17 rebuilds SmolLM2's tokenizer with byte_fallback=true beside its ByteLevel pre-tokenizer:
    still GPT-2 style. A sentencepiece-style BPE (Metaspace + byte fallback) and a Unigram model are not."""
    from yarnkit.export.gguf import is_byte_level_bpe

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert is_byte_level_bpe({"model": {"type": "BPE", "byte_fallback": True}, "pre_tokenizer": byte_level})
    assert is_byte_level_bpe({"model": {"type": "BPE"}, "pre_tokenizer": {
        "type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}})
    assert not is_byte_level_bpe({"model": {"type": "BPE", "byte_fallback": True},
                                  "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581"}})
    assert not is_byte_level_bpe({"model": {"type": "Unigram"}, "pre_tokenizer": byte_level})


LLAMA_CPP_TOLERANCE = {  # max |Δlogit| / max |logit| against transformers' logits of the same model, 320 tokens
    "f32": 1e-5,  # same weights: float32 summation order only (measured 4.2e-7, 2026-12-01, CPU)
    "f16": 2e-3,  # f16 weights, and ggml rounds activations to f16 in f16 matmuls (measured 5.2e-4)
}


def llama_cpp_logits(path, ids, **options):
    """llama.cpp's own loader and forward (llama-cpp-python, built from source in CI: see Makefile)."""
    if os.environ.get("CI"):
        import llama_cpp  # CI installs it: a missing build fails here instead of skipping the comparison
    else:
        llama_cpp = pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python (make llama-cpp)")
    llm = llama_cpp.Llama(str(path), n_ctx=1024, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0,
                          **options)  # type_k/v 0: an f32 KV cache
    llm.eval(ids)
    return torch.tensor(llm.scores[: len(ids)])


@pytest.mark.parametrize("gguf_type", ["f32", "f16"])
@pytest.mark.parametrize("case", list(CASES))
def test_llama_cpp_loads_the_yarn_export_and_agrees_with_transformers(gguf_exports, tmp_path, tokenizer, case,
                                                                      gguf_type):
    """Each YaRN x4 export (native 256 -> 1024, attention factor 1.3; CASES) in real llama.cpp: its logits on a
    320-token prompt, past the native context, match transformers' within the stated tolerance; with llama.cpp
    told to ignore the GGUF's rope scaling, or against the same weights with YaRN's default betas and ramp, they
    are far off, so the RoPE keys and frequency factors are what makes them agree."""
    import llama_cpp

    model, out, report = gguf_exports[case]
    path = out / report["gguf_file"]
    if gguf_type != report["gguf_file"].rsplit("-", 1)[1].removesuffix(".gguf"):
        path = tmp_path / f"tiny-{gguf_type}.gguf"
        write_gguf(out, model, tokenizer, path, gguf_type)
    ids = verify.prompt_ids(tokenizer, 320, 384)[0].tolist()
    assert len(ids) > YARN["original_max_position_embeddings"]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    theirs = llama_cpp_logits(path, ids)
    assert verify.max_relative_difference(ours, theirs) <= LLAMA_CPP_TOLERANCE[gguf_type]
    assert verify.max_relative_difference(ours[256:], theirs[256:]) <= LLAMA_CPP_TOLERANCE[gguf_type]
    if case == "yarn":
        without_yarn = llama_cpp_logits(path, ids, rope_scaling_type=llama_cpp.LLAMA_ROPE_SCALING_TYPE_NONE)
        assert verify.max_relative_difference(ours, without_yarn) > 50 * LLAMA_CPP_TOLERANCE[gguf_type]  # 0.17
    else:
        default_yarn = copy.deepcopy(model)
        default_yarn.config.rope_parameters = {**YARN, "attention_factor": 1.3}
        default_yarn.model.rotary_emb = type(model.model.rotary_emb)(config=default_yarn.config)
        with torch.no_grad():
            assert verify.max_relative_difference(default_yarn(torch.tensor([ids])).logits[0], theirs) > 1e-2

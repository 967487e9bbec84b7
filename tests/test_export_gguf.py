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

Tokenizer round trip, with SmolLM2's own tokenizer on a tiny model of its vocabulary: the export keeps the chat
template, BOS/EOS, whether they are added, `add_space_prefix` and the pre-tokenizer's llama.cpp name (`smollm`, as
in the bundled GGUF); yarnkit's loader reads them all back from the GGUF even where tokenizer files lie beside it;
llama.cpp tokenizes a mixed text (code, accents, emoji, numbers, special tokens) exactly as transformers does; the
files get the user's umask. A slow test exports the real model and checks its chat reply stops at EOS.
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


MIXED = ("def area(r: float) -> float:\n    return 3.14159 * r ** 2  # π r²\n\tcafé, naïve, Ünïcödé, 東京 🚀🎉\n"
         "Order #12345 costs $1,234.56 on 2026-12-06; x=-7e10, y=0x1F.\n  indented   spaces  and\r\nCRLF")


@pytest.fixture(scope="module")
def smollm_gguf(tmp_path_factory):
    """A tiny Llama of SmolLM2's vocabulary with SmolLM2's tokenizer, exported with --gguf (f32)."""
    from conftest import tiny_model

    from yarnkit.models import load_tokenizer

    root = tmp_path_factory.mktemp("smollm-gguf")
    source_tokenizer = load_tokenizer("smollm2-135m")
    model = tiny_model("llama", vocab_size=49152)
    model.save_pretrained(root / "source")
    source_tokenizer.save_pretrained(root / "source")
    report = export(root / "source", root / "out", gguf=True, gguf_type="f32", run_checks=False)
    return source_tokenizer, root / "out", root / "out" / report["gguf_file"]


def test_gguf_export_keeps_the_tokenizer_metadata(smollm_gguf):
    from yarnkit.model_files import bundled_gguf_path

    source, _, path = smollm_gguf
    meta, bundled = read_metadata(path), read_metadata(bundled_gguf_path("smollm2-135m"))
    for key in ("tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template"):
        assert meta[key] == bundled[key], key  # as the source GGUF states them
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["tokenizer.chat_template"] == source.chat_template
    assert meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.ggml.eos_token_id"] == source.eos_token_id


def test_yarnkit_reads_the_tokenizer_back_from_the_gguf_beside_tokenizer_files(smollm_gguf):
    """The GGUF lies in the export folder next to tokenizer_config.json; its own metadata must still win."""
    from yarnkit.models import load_tokenizer

    source, out, path = smollm_gguf
    assert (out / "tokenizer_config.json").is_file() and path.parent == out
    loaded = load_tokenizer(path)
    assert loaded.chat_template == source.chat_template
    assert (loaded.eos_token, loaded.bos_token) == (source.eos_token, source.bos_token) == ("<|im_end|>",
                                                                                            "<|im_start|>")
    assert loaded(MIXED)["input_ids"] == source(MIXED)["input_ids"]
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~models_umask()  # not 0600


def models_umask() -> int:
    from yarnkit.model_files import user_umask

    return user_umask()


def test_llama_cpp_tokenizes_like_transformers(smollm_gguf):
    """Token for token, with llama.cpp's own tokenizer (the GGUF's pre-tokenizer, BOS flag and control tokens)."""
    if os.environ.get("CI"):
        import llama_cpp
    else:
        llama_cpp = pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python (make llama-cpp)")
    from yarnkit.model_files import bundled_gguf_path

    source, _, path = smollm_gguf
    chat = source.apply_chat_template([{"role": "user", "content": MIXED}], tokenize=False, add_generation_prompt=True)
    for gguf_file in (path, bundled_gguf_path("smollm2-135m")):  # the export, and the source it must match
        llm = llama_cpp.Llama(str(gguf_file), vocab_only=True, verbose=False)
        assert llm.tokenize(MIXED.encode(), add_bos=False) == source(MIXED, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(MIXED.encode()) == source(MIXED)["input_ids"]  # the add_bos flag agrees too
        assert llm.tokenize(chat.encode(), add_bos=False, special=True) == source(
            chat, add_special_tokens=False)["input_ids"]
        assert llm.token_eos() == source.eos_token_id and llm.token_bos() == source.bos_token_id


@pytest.mark.slow
def test_chat_reply_of_an_exported_gguf_stops_at_eos(tmp_path):
    """`yarnkit export SmolLM2 --gguf --gguf-type q8_0`, then chat with the GGUF: the greedy reply ends with EOS,
    not at the token limit (the tokenizer read back has the chat template and EOS)."""
    from yarnkit.model_files import local_hf_dir
    from yarnkit.runtime.conversation import Conversation
    from yarnkit.runtime.options import StreamOptions, load_chat_model

    report = export(local_hf_dir("smollm2-135m"), tmp_path / "exported", gguf=True, gguf_type="q8_0",
                    run_checks=False)
    model, tokenizer = load_chat_model(str(tmp_path / "exported" / report["gguf_file"]))
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    conversation = Conversation(model, tokenizer, StreamOptions(window=1024))
    reply = "".join(conversation.respond([{"role": "user", "content": "What is the capital of France?"}],
                                         max_new_tokens=200))
    assert "Paris" in reply
    assert conversation.last_info["finish_reason"] == "stop" and conversation.last_info["completion_tokens"] < 200


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


def test_bos_and_eos_come_from_the_gguf_ids():
    """transformers 5.17 reads SmolLM2's GGUF with EOS = BOS; the conversion restores the ids the file names."""
    from yarnkit.gguf_tokenizer import restore_bos_eos
    from yarnkit.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    tokenizer.eos_token = tokenizer.bos_token  # what 5.17's conversion gives
    metadata = {"tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    assert restore_bos_eos(tokenizer, metadata)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert not restore_bos_eos(tokenizer, metadata)  # already right: nothing to change

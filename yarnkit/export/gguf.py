"""Write a llama.cpp GGUF of an exported Llama-architecture HF folder, YaRN included, and read its RoPE back.

`write_gguf(folder, model, path, gguf_type)` writes what llama.cpp's own `convert_hf_to_gguf.py` writes for a
Llama model: the hyper-parameters, the byte-level BPE tokenizer (`tokenizer.ggml.model = gpt2`) with its
pre-tokenizer's llama.cpp name (`yarnkit.gguf_tokenizer`), BOS/EOS ids, whether they are added
(`add_bos_token`/`add_eos_token`, measured on the tokenizer), `add_space_prefix` and the chat template, the tensors
under llama.cpp's names (`gguf.get_tensor_name_map`) with Q and K rows permuted to llama.cpp's rotary layout.
`llama.context_length` is the extended context. The RoPE goes in one of two exact forms (`llama_cpp_encoding`):

- `yarn`: the keys of `gguf.constants.Keys.Rope`, `llama.rope.scaling.type = "yarn"`, `.factor`,
  `.original_context_length`, and `.attn_factor` when the attention factor is not 0.1·ln(s)+1 (llama.cpp's
  llama-context.cpp multiplies its own 0.1·ln(s)+1 by `rope.scaling.attn_factor`, so the value is transformers'
  factor / (0.1·ln s + 1)). Used when the model's YaRN is llama.cpp's built-in one: betas 32/1, truncated ramp.
- `freq_factors`: llama.cpp reads `rope.scaling.yarn_beta_fast/slow` only for a few other architectures (grok,
  laguna, ...; measured: a Llama GGUF with those keys runs betas 32/1) and always truncates the ramp, so other
  betas or `truncate=false` are written as the per-pair frequency divisors Llama 3.1 GGUFs carry:
  `rope_freqs.weight` = θ_i / θ'_i (θ' = the model's YaRN frequencies), `rope.scaling.type = "none"` and
  `.attn_factor` = transformers' attention factor (with no YaRN scaling llama.cpp applies it as is).

`llama_cpp_rope(path)` rebuilds, from the metadata and `rope_freqs`, the inverse frequencies and attention factor
llama.cpp runs, for verification (transformers' GGUF loader ignores Llama's rope-scaling keys).

Not supported (clear error): other architectures, sentencepiece tokenizers, rope types other than yarn/linear.
Tested by tests/test_export_gguf.py, against llama.cpp itself (llama-cpp-python) included.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from yarnkit.export import rope_keys
from yarnkit.errors import ExportError
from yarnkit.gguf_tokenizer import adds_special_tokens, pre_tokenizer_name
from yarnkit.rope import compute_inv_freq, default_inv_freq, head_dim as config_head_dim, yarn_get_mscale, yarn_inv_freq
from yarnkit.sink_token import GGUF_SINK_KEY

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
LLAMA_CPP_YARN = {"beta_fast": 32.0, "beta_slow": 1.0, "truncate": True}  # the only YaRN llama.cpp runs for Llama
ROPE_FREQS = "rope_freqs.weight"


def _check_supported(config) -> dict:
    if config.model_type != "llama":
        raise ExportError(f"--gguf supports the Llama architecture only, this model is {config.model_type!r}; export "
                          "the HF folder and convert it with llama.cpp's convert_hf_to_gguf.py")
    rope = dict(config.rope_parameters)
    if rope_keys.is_per_layer_type(rope):
        raise ExportError("--gguf: per-layer-type RoPE is not supported for Llama")
    llama_cpp_encoding(rope)  # refuses what llama.cpp cannot run
    return rope


def llama_cpp_encoding(rope: dict) -> str:
    """How the GGUF carries `rope` exactly: "default", "linear", "yarn" (llama.cpp's built-in YaRN is the model's)
    or "freq_factors" (other betas or an untruncated ramp: per-pair divisors in `rope_freqs.weight`)."""
    kind = rope.get("rope_type", "default")
    if kind == "yarn":
        builtin = all(rope.get(key, value) == value for key, value in LLAMA_CPP_YARN.items())
        return "yarn" if builtin else "freq_factors"
    if kind in ("default", "linear"):
        return kind
    raise ExportError(f"--gguf: rope_type {kind!r} has no llama.cpp Llama equivalent",
                      "export without --gguf, or fine-tune with yarn.rope_type=yarn")


def llama_cpp_attn_factor(rope: dict) -> float:
    """llama.cpp's `rope.scaling.attn_factor` multiplies its built-in 0.1·ln(s)+1; transformers' attention factor
    (explicit, or the mscale ratio) replaces it. The ratio of the two expresses one in the other."""
    return rope_keys.attention_factor(rope) / yarn_get_mscale(float(rope["factor"]))


def frequency_factors(config, rope: dict) -> np.ndarray:
    """θ_i / θ'_i per rotary pair, θ' the model's YaRN frequencies (float64 maths, stored float32): llama.cpp
    divides each pair's base frequency by its factor."""
    dim = config_head_dim(config)
    scaled, _ = compute_inv_freq(rope, dim, config.max_position_embeddings)
    return (default_inv_freq(dim, float(rope["rope_theta"])) / scaled).numpy().astype(np.float32)


def gguf_pre_name(tokenizer_json: dict, override: str | None) -> tuple[str, list[str]]:
    """llama.cpp's pre-tokenizer name for this tokenizer.json, or "default" with a note saying how to fix it."""
    if override:
        return override, []
    name = pre_tokenizer_name(tokenizer_json.get("pre_tokenizer"))
    if name is not None:
        return name, []
    return "default", ["unknown pre-tokenizer: wrote tokenizer.ggml.pre=default; pass --gguf-pre with llama.cpp's "
                       "name for it (e.g. llama-bpe, qwen2, smollm) for exact tokenization in llama.cpp"]


def is_byte_level_bpe(tokenizer_json: dict) -> bool:
    """GPT-2 style: a BPE model whose pre-tokenizer (alone or inside a Sequence) is ByteLevel. Some converters
    (transformers 5.17's GGUF reader) also set `byte_fallback` on such tokenizers; it is inert there, since every
    byte already is a token, so it does not make the tokenizer sentencepiece-like."""
    if tokenizer_json.get("model", {}).get("type") != "BPE":
        return False
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    return any(part.get("type") == "ByteLevel" for part in parts)


def _add_tokenizer(writer, folder: Path, tokenizer, vocab_size: int, pre: str | None) -> list[str]:
    import gguf

    tokenizer_json = json.loads((folder / "tokenizer.json").read_text()) if (folder / "tokenizer.json").is_file() else {}
    if not is_byte_level_bpe(tokenizer_json):
        raise ExportError("--gguf supports byte-level BPE tokenizers (gpt2 style: SmolLM2, Llama 3, Qwen) only; "
                          "convert sentencepiece models with llama.cpp's convert_hf_to_gguf.py")
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    name, notes = gguf_pre_name(tokenizer_json, pre)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(name)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    special.add_special_token.update(adds_special_tokens(tokenizer))  # measured, not guessed from the files
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template  # transformers 5 keeps it in chat_template.jinja
    special.add_to_gguf(writer, quiet=True)
    pre_tokenizer = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    writer.add_add_space_prefix(any(part.get("add_prefix_space") for part in parts if part.get("type") == "ByteLevel"))
    return notes


def _permute_rotary_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF's half-split rotary layout -> llama.cpp's interleaved one (inverse of transformers' GGUF reader)."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _encode(array: np.ndarray, gguf_type: str):
    """`(data, raw_dtype)` for GGUFWriter.add_tensor; 1-D tensors stay f32 like llama.cpp's converter."""
    import gguf

    q = gguf.GGMLQuantizationType
    if array.ndim == 1 or gguf_type == "f32":
        return array.astype(np.float32), None
    if gguf_type == "f16" or (gguf_type == "q8_0" and array.shape[-1] % 32):
        return array.astype(np.float16), None
    qtype = q.BF16 if gguf_type == "bf16" else q.Q8_0
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


def stored_values(array: np.ndarray, gguf_type: str) -> np.ndarray:
    """The float32 values a GGUF reader gets back for `array` written as `gguf_type` (quantize, dequantize)."""
    import gguf

    data, raw_dtype = _encode(array, gguf_type)
    if raw_dtype is None:
        return data.astype(np.float32)
    return gguf.quants.dequantize(data, raw_dtype).reshape(array.shape).astype(np.float32)


def _file_type(gguf_type: str) -> int:
    import gguf

    t = gguf.LlamaFileType
    return {"f32": t.ALL_F32, "f16": t.MOSTLY_F16, "bf16": t.MOSTLY_BF16, "q8_0": t.MOSTLY_Q8_0}[gguf_type]


def _add_hparams(writer, config, rope: dict, name: str, gguf_type: str) -> None:
    import gguf

    head_dim = config_head_dim(config)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_file_type(gguf_type))
    encoding = llama_cpp_encoding(rope)
    if encoding == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        attn_factor = llama_cpp_attn_factor(rope)
        if not math.isclose(attn_factor, 1.0, rel_tol=1e-7):
            writer.add_rope_scaling_attn_factors(attn_factor)
    elif encoding == "freq_factors":
        writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)
        attn_factor = rope_keys.attention_factor(rope)
        if not math.isclose(attn_factor, 1.0, rel_tol=1e-7):
            writer.add_rope_scaling_attn_factors(attn_factor)
        writer.add_tensor(ROPE_FREQS, frequency_factors(config, rope))
    elif encoding == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    sink = getattr(config, "yarnkit_sink_token_id", None)
    if sink is not None:
        writer.add_uint32(GGUF_SINK_KEY, int(sink))


def write_gguf(folder: Path, model, tokenizer, path: Path, gguf_type: str = "f16", pre: str | None = None) -> list[str]:
    """Write `path` from the exported `folder` (tokenizer files) and the in-memory `model`. Returns notes."""
    import gguf
    from tqdm import tqdm

    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"unknown --gguf-type {gguf_type!r}; choose one of {GGUF_TYPES}")
    config = model.config
    rope = _check_supported(config)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_hparams(writer, config, rope, path.stem, gguf_type)
    notes = _add_tokenizer(writer, folder, tokenizer, config.vocab_size, pre)
    if llama_cpp_encoding(rope) == "freq_factors":
        custom = ", ".join(f"{k}={rope.get(k, v)}" for k, v in LLAMA_CPP_YARN.items() if rope.get(k, v) != v)
        notes.append(f"YaRN with {custom} written as per-pair frequency factors ({ROPE_FREQS}, rope.scaling.type "
                     "none): llama.cpp's Llama loader reads no YaRN beta or truncate keys. Run it without "
                     "--rope-scaling/--rope-scale, which would scale the frequencies a second time")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in tqdm(model.state_dict().items(), desc="GGUF tensors", leave=False):
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"--gguf: no llama.cpp name for tensor {hf_name}")
        array = tensor.detach().to(torch.float32).numpy()
        if hf_name.endswith("self_attn.q_proj.weight"):
            array = _permute_rotary_rows(array, config.num_attention_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            array = _permute_rotary_rows(array, config.num_key_value_heads)
        data, raw_dtype = _encode(array, gguf_type)
        writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return notes


def read_metadata(path: Path) -> dict:
    """All scalar/string GGUF key-values (arrays such as the vocabulary are skipped)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for key, field in reader.fields.items():
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        out[key] = field.contents()
    return out


def llama_cpp_rope(path: Path) -> dict:
    """The RoPE llama.cpp runs for a Llama GGUF, from its metadata: `inv_freq` (float64, per rotary pair),
    `attention_factor` (what cos and sin are multiplied by), `context_length`, and the keys it came from.
    YaRN keys mean llama.cpp's built-in YaRN (betas 32/1, truncated ramp, attention factor = `attn_factor` ×
    (0.1·ln s + 1)); `rope_freqs.weight` divides every pair's frequency, whatever the scaling type."""
    import gguf

    meta = read_metadata(path)
    arch = meta["general.architecture"]
    dim, base = int(meta[f"{arch}.rope.dimension_count"]), float(meta[f"{arch}.rope.freq_base"])
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    attn_factor = float(meta.get(f"{arch}.rope.scaling.attn_factor", 1.0))
    keys = {"scaling_type": kind, "attn_factor": attn_factor}
    inv_freq, attention = default_inv_freq(dim, base), attn_factor
    if kind == "yarn":
        factor = float(meta[f"{arch}.rope.scaling.factor"])
        original = int(meta[f"{arch}.rope.scaling.original_context_length"])
        inv_freq, attention = yarn_inv_freq(dim, base, factor, original), attn_factor * yarn_get_mscale(factor)
        keys.update(factor=factor, original_context_length=original)
    elif kind == "linear":
        factor = float(meta.get(f"{arch}.rope.scaling.factor", 1.0))
        inv_freq = inv_freq / factor
        keys.update(factor=factor)
    freqs = [t for t in gguf.GGUFReader(str(path)).tensors if t.name == ROPE_FREQS]
    if freqs:
        inv_freq = inv_freq / torch.from_numpy(np.asarray(freqs[0].data, dtype=np.float64).reshape(-1))
        keys["frequency_factors"] = ROPE_FREQS
    return {"inv_freq": inv_freq, "attention_factor": attention, "context_length": int(meta[f"{arch}.context_length"]),
            "keys": keys}

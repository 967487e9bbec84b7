"""Write a llama.cpp GGUF of an exported Llama-architecture HF folder, YaRN included, and read its RoPE back.

`write_gguf(folder, model, path, gguf_type)` writes what llama.cpp's own `convert_hf_to_gguf.py` writes for a
Llama model: the hyper-parameters, the byte-level BPE tokenizer (`tokenizer.ggml.model = gpt2`) with its
pre-tokenizer's llama.cpp name (`yarnkit.gguf_tokenizer`), BOS/EOS ids, whether they are added
(`add_bos_token`/`add_eos_token`, measured on the tokenizer), `add_space_prefix` and the chat template, the tensors
under llama.cpp's names (`gguf.get_tensor_name_map`) with Q and K rows permuted to llama.cpp's rotary layout, and
the YaRN keys from `gguf.constants.Keys.Rope`: `llama.rope.scaling.type = "yarn"`, `.factor`,
`.original_context_length`, and `.attn_factor` when the attention factor is not 0.1·ln(s)+1 (llama.cpp
multiplies its own by it); `llama.context_length` is the extended context. llama.cpp reads the
`.yarn_beta_fast/.yarn_beta_slow` keys only for grok and mistral3 (checked in its source), so none are written
and a Llama with other betas is refused. `rope_parameters_from_gguf(path)` turns the keys back into a
transformers `rope_parameters` dict, as llama.cpp runs them, for verification (transformers' GGUF loader
ignores Llama's rope-scaling keys).

Not supported (clear error): other architectures, sentencepiece tokenizers, YaRN betas other than 32/1, and
`truncate=false`.
Tested by tests/test_export_gguf.py.
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
from yarnkit.rope import head_dim as config_head_dim, yarn_attention_factor, yarn_get_mscale
from yarnkit.sink_token import GGUF_SINK_KEY

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
LLAMA_CPP_FIXED_BETAS = {"beta_fast": 32.0, "beta_slow": 1.0}  # llama.cpp reads beta keys only for grok/mistral3


def _check_supported(config) -> dict:
    if config.model_type != "llama":
        raise ExportError(f"--gguf supports the Llama architecture only, this model is {config.model_type!r}; export "
                          "the HF folder and convert it with llama.cpp's convert_hf_to_gguf.py")
    rope = dict(config.rope_parameters)
    if rope_keys.is_per_layer_type(rope):
        raise ExportError("--gguf: per-layer-type RoPE is not supported for Llama")
    custom = [f"{k}={rope[k]}" for k, default in LLAMA_CPP_FIXED_BETAS.items() if rope.get(k, default) != default]
    if rope.get("truncate") is False:
        custom.append("truncate=false")
    if custom:
        raise ExportError(f"--gguf: llama.cpp reads no beta or truncate keys for Llama (it always uses beta_fast=32, "
                          f"beta_slow=1, truncated ranges); this model sets {', '.join(custom)}. Export without --gguf "
                          "and run llama.cpp with --yarn-beta-fast/--yarn-beta-slow on a converted file")
    return rope


def llama_cpp_attn_factor(rope: dict) -> float:
    """llama.cpp's `rope.scaling.attn_factor` multiplies its built-in 0.1·ln(s)+1; transformers' attention factor
    (explicit, or the mscale ratio) replaces it. The ratio of the two expresses one in the other."""
    factor = float(rope["factor"])
    wanted = yarn_attention_factor(factor, rope.get("attention_factor"), rope.get("mscale"), rope.get("mscale_all_dim"))
    return wanted / yarn_get_mscale(factor)


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
    if rope.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        attn_factor = llama_cpp_attn_factor(rope)
        if not math.isclose(attn_factor, 1.0, rel_tol=1e-7):
            writer.add_rope_scaling_attn_factors(attn_factor)
    elif rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope.get("rope_type", "default") != "default":
        raise ExportError(f"--gguf: rope_type {rope['rope_type']!r} has no llama.cpp Llama equivalent here")
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


def rope_parameters_from_gguf(path: Path) -> tuple[dict, int]:
    """`(rope_parameters, context_length)` in transformers' terms, as llama.cpp runs a Llama GGUF: betas 32/1,
    attention factor = `rope.scaling.attn_factor` × (0.1·ln s + 1)."""
    meta = read_metadata(path)
    arch = meta["general.architecture"]
    rope = {"rope_type": "default", "rope_theta": float(meta[f"{arch}.rope.freq_base"])}
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "yarn":
        rope.update(rope_type="yarn", factor=float(meta[f"{arch}.rope.scaling.factor"]),
                    original_max_position_embeddings=int(meta[f"{arch}.rope.scaling.original_context_length"]))
        attn_factor = float(meta.get(f"{arch}.rope.scaling.attn_factor", 1.0))
        if attn_factor != 1.0:
            rope["attention_factor"] = attn_factor * yarn_get_mscale(rope["factor"])
    elif kind == "linear":
        rope.update(rope_type="linear", factor=float(meta[f"{arch}.rope.scaling.factor"]))
    return rope, int(meta[f"{arch}.context_length"])

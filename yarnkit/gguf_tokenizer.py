"""The tokenizer facts a GGUF states in llama.cpp's words and a `tokenizer.json` in Hugging Face's, kept equal.

llama.cpp names its pre-tokenizer (`tokenizer.ggml.pre`, e.g. `smollm`: digits split one by one, then GPT-2's
regex); a tokenizer.json spells the same splitting as a `pre_tokenizer` tree. `PRE_TOKENIZERS` is the one table
of pairs yarnkit knows. Reading a GGUF, transformers rebuilds only the splits it has a regex for and leaves GPT-2's
for others (`smollm` among them), so `restore_pre_tokenizer` puts the named one back; writing a GGUF,
`pre_tokenizer_name` finds the name of a tokenizer.json's splitting (`yarnkit.export.gguf`). `adds_special_tokens`
measures whether the tokenizer puts BOS/EOS around a text, for `tokenizer.ggml.add_bos_token` / `add_eos_token`.
`gguf_scalars` reads a GGUF's metadata without its token arrays (transformers' reader, in a fraction of a second;
`gguf.GGUFReader` where transformers has none, 5.17: ~7 s for SmolLM2's 49k tokens).
"""

from __future__ import annotations

import json

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
# tokenizer.json pre_tokenizer (trim_offsets ignored) -> llama.cpp `tokenizer.ggml.pre` with the same splitting
PRE_TOKENIZERS = [
    (_BYTE_LEVEL, "gpt-2"),  # GPT-2's regex
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]}, "smollm"),
]


def gguf_scalars(path) -> dict:
    """A GGUF's metadata keys and values, arrays (the vocabulary) left out or as their length."""
    try:
        from transformers.integrations.gguf import read_gguf_metadata
    except ImportError:
        import gguf

        reader = gguf.GGUFReader(str(path))
        return {key: field.contents() for key, field in reader.fields.items()
                if not (field.types and field.types[0] == gguf.GGUFValueType.ARRAY)}
    return read_gguf_metadata(str(path))[0]


def without_offsets(node):
    """A pre_tokenizer tree without `trim_offsets` (it moves offsets, never the split)."""
    if isinstance(node, dict):
        return {k: without_offsets(v) for k, v in node.items() if k != "trim_offsets"}
    if isinstance(node, list):
        return [without_offsets(v) for v in node]
    return node


def _with_offsets(node):
    """The tree as `tokenizers` reads it: ByteLevel needs its `trim_offsets` (True, as every HF tokenizer.json)."""
    if isinstance(node, list):
        return [_with_offsets(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _with_offsets(v) for k, v in node.items()}
    return {**node, "trim_offsets": True} if node.get("type") == "ByteLevel" else node


def pre_tokenizer_name(pre_tokenizer: dict | None) -> str | None:
    """llama.cpp's name for this tokenizer.json `pre_tokenizer`, or None when yarnkit knows none."""
    pre = without_offsets(pre_tokenizer)
    return next((name for known, name in PRE_TOKENIZERS if pre == known), None)


def restore_pre_tokenizer(tokenizer, gguf_pre: str | None) -> bool:
    """Give `tokenizer` (read from a GGUF by transformers) the splitting its file names in `tokenizer.ggml.pre`,
    when yarnkit knows that name and transformers did not apply it. True when it changed something."""
    wanted = next((known for known, name in PRE_TOKENIZERS if name == gguf_pre), None)
    backend = tokenizer.backend_tokenizer
    current = json.loads(backend.to_str()).get("pre_tokenizer")
    if wanted is None or without_offsets(current) == wanted:
        return False
    from tokenizers import Tokenizer

    shell = {"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []},
             "pre_tokenizer": _with_offsets(wanted)}
    backend.pre_tokenizer = Tokenizer.from_str(json.dumps(shell)).pre_tokenizer
    return True


def restore_bos_eos(tokenizer, metadata: dict) -> bool:
    """Give `tokenizer` the BOS and EOS tokens its GGUF names (`tokenizer.ggml.bos_token_id` / `eos_token_id`):
    transformers 5.17 reads a GPT-2-type GGUF tokenizer with EOS = BOS (SmolLM2: `<|im_start|>` for both), so a
    chat reply would never stop. True when it changed something."""
    changed = False
    for role in ("bos", "eos"):
        token_id = metadata.get(f"tokenizer.ggml.{role}_token_id")
        if token_id is None or getattr(tokenizer, f"{role}_token_id") == int(token_id):
            continue
        setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(int(token_id)))
        changed = True
    return changed


def adds_special_tokens(tokenizer) -> dict[str, bool]:
    """`{"bos": ..., "eos": ...}`: whether encoding a text with special tokens puts BOS first / EOS last."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {"bos": bos is not None and len(full) > len(plain) and full[0] == bos,
            "eos": eos is not None and len(full) > len(plain) and full[-1] == eos}

"""A dedicated learnable attention-sink token (StreamingLLM §3.3): one new vocabulary entry placed at position 0 of
every training sequence, so a streaming cache needs to keep only that one token as its sink.

`add_sink_token(model, tokenizer, text, init)` adds the token to the tokenizer (a special token, never produced by
normal text), resizes the embeddings (tied models: input and output share the new row), initialises the new row
and records its id as `model.config.yarnkit_sink_token_id`, the attribute that export (config.json, GGUF key
`yarnkit.sink_token_id`) and the runtime (1 pinned sink, prepended automatically) read. Initialisation for
continued training (`init`): `bos` copies the BOS row, the token pre-trained models already see at position 0 and
use as their sink, so training starts from a working sink instead of an unfamiliar vector; `mean` uses the mean of
all rows. A from-scratch model gets its row from the model's own random init (`init` is ignored: the token is in
the vocabulary before the model is built).

A tokenizer that already has the token text is reused only when the model's config records that id as its sink
(continuing a sink-token checkpoint); any other existing token is refused, because it also occurs inside text and
would not be a dedicated position-0 token. The data side (prepending to every chunk, PoSE positions) lives in
yarnkit/train/data.py.

A grown vocabulary is padded to a multiple of `VOCAB_MULTIPLE` rows (`padded_vocab_size`): 49152 + 1 rows make
every output-head matmul misaligned for the GPU's tensor cores (measured on an H200: 218 vs 140 ms per training
step of a 31.5M model, docs/results.md §5); the padding rows are never produced by the tokenizer (the GGUF export
names them `[PADn]`). Downstream, `streaming_sinks` is the runtime's rule for how many sinks to keep (1 for a
sink-token model; 0 is allowed with a warning), and `read_gguf_sink_token` restores the id from a GGUF's
`yarnkit.sink_token_id` key, which transformers' GGUF loader does not read. Tested by
`python -m pytest tests/test_sink.py tests/test_sink_e2e.py -q`.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch

from yarnkit.errors import SinkTokenError

SINK_ATTR = "yarnkit_sink_token_id"
GGUF_SINK_KEY = "yarnkit.sink_token_id"
INITS = ("bos", "mean")
VOCAB_MULTIPLE = 64


class SinkTokenWarning(UserWarning):
    """A setting that works but throws away what the sink token is for."""


def padded_vocab_size(size: int) -> int:
    """`size` rounded up to a multiple of `VOCAB_MULTIPLE`."""
    return -(-size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def sink_token_id(tokenizer, text: str) -> int | None:
    """The id of `text` if it is one token of the tokenizer's vocabulary, else None."""
    return tokenizer.get_vocab().get(text)


def register_sink_token(tokenizer, config, text: str) -> tuple[int, bool]:
    """Add `text` as a special token to `tokenizer` (in place). Returns `(id, is_new)`; raises for a token the model
    already knows as ordinary text."""
    if not text:
        raise SinkTokenError("model.sink_token_text is empty; use e.g. <|sink|>")
    existing, recorded = sink_token_id(tokenizer, text), getattr(config, SINK_ATTR, None)
    if existing is not None:
        if recorded == existing:
            return existing, False
        raise SinkTokenError(f"model.sink_token_text={text!r} is already token {existing} of the tokenizer and the "
                             f"model does not record it as its sink (config.{SINK_ATTR}={recorded}): it also occurs "
                             "in ordinary text, so it cannot be a dedicated sink; pick a new text such as <|sink|>")
    if recorded is not None:
        raise SinkTokenError(f"the model already has a sink token (id {recorded}) but its tokenizer has no "
                             f"{text!r}; set model.sink_token_text to that token's text")
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(text, special=True, normalized=False)], special_tokens=True)
    return sink_token_id(tokenizer, text), True


def rows(weight) -> int:
    """Rows of an embedding matrix, also when DeepSpeed ZeRO-3 holds only this process's shard (`ds_shape`)."""
    return getattr(weight, "ds_shape", weight.shape)[0]


@contextmanager
def writable(*weights):
    """Whole, writable parameters inside the block: ZeRO-3 shards are gathered and rank 0's writes kept."""
    sharded = [w for w in weights if hasattr(w, "ds_id")]
    if not sharded:
        with torch.no_grad():
            yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(sharded, modifier_rank=0), torch.no_grad():
        yield


def grow_vocabulary(model, size: int) -> None:
    """Resize the embeddings (and an untied head) to `size` rows rounded up by `padded_vocab_size`; new rows get
    the mean of the old ones, so the result is deterministic (export rebuilds the same untied head rows before
    merging a LoRA adapter)."""
    old = rows(model.get_input_embeddings().weight)
    model.resize_token_embeddings(padded_vocab_size(size), mean_resizing=False)
    weights = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())
               if m is not None}.values()
    with writable(*weights):
        for weight in weights:
            weight[old:] = weight[:old].mean(0)


def add_sink_token(model, tokenizer, text: str = "<|sink|>", init: str = "bos") -> int:
    """Add the sink token to `tokenizer` and `model` (in place) and record its id in `model.config`; returns it."""
    if init not in INITS:
        raise SinkTokenError(f"model.sink_token_init={init!r}; choose one of {INITS}")
    token_id, is_new = register_sink_token(tokenizer, model.config, text)
    if token_id >= rows(model.get_input_embeddings().weight):
        grow_vocabulary(model, len(tokenizer))
    if is_new:
        weight, bos = model.get_input_embeddings().weight, tokenizer.bos_token_id
        with writable(weight):
            weight[token_id] = weight[bos] if init == "bos" and bos is not None else weight[:token_id].mean(0)
    setattr(model.config, SINK_ATTR, int(token_id))
    return int(token_id)


STREAMING_LLM_SINKS = 4  # StreamingLLM's initial tokens for a model trained without a sink token


def streaming_sinks(config, requested: int | None = None) -> int:
    """The one home of the runtime's sink rule: how many initial tokens a streaming cache keeps: `requested`, or
    (None) 1 for a model trained with a sink token and `STREAMING_LLM_SINKS` otherwise. 0 on a sink-token model is allowed with a `SinkTokenWarning`: the sink is then
    evicted like any other token, which StreamingLLM measured as ppl 18 -> 1235 (Table 3)."""
    sink = getattr(config, SINK_ATTR, None)
    if requested is None:
        return STREAMING_LLM_SINKS if sink is None else 1
    if requested == 0 and sink is not None:
        warnings.warn(f"this model was trained with a dedicated sink token (id {sink}); --sinks 0 lets it be evicted "
                      "and streaming quality then drops sharply; keep --sinks 1 (the default for this model)",
                      SinkTokenWarning, stacklevel=3)
    return requested


def read_gguf_sink_token(config, gguf_path, metadata: dict | None = None) -> int | None:
    """Copy a GGUF's `yarnkit.sink_token_id` into `config` (in place); returns it, or None when absent.
    `metadata`: the file's metadata when the caller has read it already (`yarnkit.gguf_tokenizer.gguf_scalars`)."""
    from yarnkit.gguf_tokenizer import gguf_scalars

    value = (metadata if metadata is not None else gguf_scalars(gguf_path)).get(GGUF_SINK_KEY)
    if value is None:
        return None
    setattr(config, SINK_ATTR, int(value))
    return getattr(config, SINK_ATTR)

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
yarnkit/train/data.py. Tested by `python -m pytest tests/test_sink.py -q`.
"""

from __future__ import annotations

import torch

SINK_ATTR = "yarnkit_sink_token_id"
INITS = ("bos", "mean")


class SinkTokenError(ValueError):
    """A sink-token setting that cannot work; the message names the fix."""


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


def grow_vocabulary(model, size: int) -> None:
    """Resize the embeddings (and an untied head) to `size` rows; new rows get the mean of the old ones, so the
    result is deterministic (export rebuilds the same untied head rows before merging a LoRA adapter)."""
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        for module in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())
                       if m is not None}.values():
            module.weight[old:] = module.weight[:old].mean(0)


def add_sink_token(model, tokenizer, text: str = "<|sink|>", init: str = "bos") -> int:
    """Add the sink token to `tokenizer` and `model` (in place) and record its id in `model.config`; returns it."""
    if init not in INITS:
        raise SinkTokenError(f"model.sink_token_init={init!r}; choose one of {INITS}")
    token_id, is_new = register_sink_token(tokenizer, model.config, text)
    if token_id >= model.get_input_embeddings().weight.shape[0]:
        grow_vocabulary(model, len(tokenizer))
    if is_new:
        with torch.no_grad():
            weight = model.get_input_embeddings().weight
            bos = tokenizer.bos_token_id
            weight[token_id] = weight[bos] if init == "bos" and bos is not None else weight[:token_id].mean(0)
    setattr(model.config, SINK_ATTR, int(token_id))
    return int(token_id)

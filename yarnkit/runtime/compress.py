"""LLMLingua-style prompt compression: drop the least informative tokens of a long context before it is cached.

What it is: budget-controlled token-level pruning by a small causal LM's self-information (-log p), done
segment by segment with each segment conditioned on the already-compressed text before it (LLMLingua's
iterative token-level compression, arXiv 2310.05736 §3.3). The instruction and the question are kept verbatim;
only the context between them is pruned. The scorer is the chat model itself or any smaller LM sharing its
tokenizer. What it is not: LLMLingua's coarse demonstration-level filter, its distribution alignment, or
LLMLingua-2's trained classifier.

Test: `python -m pytest tests/test_runtime_retention.py tests/test_runtime_chat.py -q -k compress`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Compressed:
    text: str
    original_tokens: int
    compressed_tokens: int

    @property
    def ratio(self) -> float:
        """original / compressed context tokens (LLMLingua reports e.g. "5.0x")."""
        return self.original_tokens / max(1, self.compressed_tokens)


def split_prompt(text: str) -> tuple[str, str, str]:
    """`(instruction, context, question)`: first line, middle lines, last line (a one-line text is all context)."""
    lines = text.strip("\n").split("\n")
    if len(lines) < 3:
        return "", text, ""
    return lines[0], "\n".join(lines[1:-1]), lines[-1]


@torch.no_grad()
def token_self_information(model, prefix_ids: list[int], ids: list[int]) -> torch.Tensor:
    """-log p(ids[i] | prefix, ids[:i]) for each of `ids` (the first one needs a non-empty prefix, else +inf)."""
    full = torch.tensor([prefix_ids + ids])
    device = next(model.parameters()).device
    logp = torch.log_softmax(model(full.to(device)).logits[0].float().cpu(), dim=-1)
    start = len(prefix_ids)
    info = torch.full((len(ids),), float("inf"))
    for i in range(len(ids)):
        if start + i > 0:
            info[i] = -logp[start + i - 1, ids[i]]
    return info


def compress_context(model, tokenizer, context: str, rate: float = 0.5, segment: int = 200,
                     condition_tokens: int = 256) -> Compressed:
    """Keep about `rate` of the context's tokens: in each `segment`, those with the highest self-information.

    Each segment is scored after the last `condition_tokens` already-kept tokens, so a fact stated once stays
    (surprising) while its repetitions become predictable and are dropped.
    """
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"rate={rate} must be in (0, 1]")
    ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    if rate == 1.0 or len(ids) == 0:
        return Compressed(context, len(ids), len(ids))
    kept: list[int] = []
    for start in range(0, len(ids), segment):
        piece = ids[start:start + segment]
        info = token_self_information(model, kept[-condition_tokens:], piece)
        budget = max(1, round(rate * len(piece)))
        chosen = sorted(info.topk(budget).indices.tolist())
        kept.extend(piece[i] for i in chosen)
    return Compressed(tokenizer.decode(kept), len(ids), len(kept))


def compress_prompt(model, tokenizer, text: str, rate: float = 0.5, **kwargs) -> Compressed:
    """Compress a user message: instruction (first line) and question (last line) kept, the rest pruned."""
    instruction, context, question = split_prompt(text)
    squeezed = compress_context(model, tokenizer, context, rate, **kwargs)
    parts = [part for part in (instruction, squeezed.text, question) if part]
    return Compressed("\n".join(parts), squeezed.original_tokens, squeezed.compressed_tokens)

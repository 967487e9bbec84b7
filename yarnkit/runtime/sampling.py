"""Choosing next tokens on the model's device: greedy, temperature and top-p, a whole batch in one go.

    tokens = choose_tokens(logits, temperatures, top_ps, generators)   # logits [B, vocab] -> B ints
    token = sample(logits_row, temperature, top_p, generator)         # one row
    ids = IdsInFlight(choose_on_device(logits, temperatures, top_ps, generators))  # [B] stay on the device
    tokens = ids.tolist()                                  # later: waits for the step that chose them, no more

What it is: the sampler of the streaming runtime. Logits stay where the model left them; only the chosen ids
come back to the host, in one small copy per call. Rows with temperature 0 take the argmax (ties: the lowest id,
as `torch.argmax` everywhere). Sampled rows: softmax of `(logits - max) / temperature` in float64, then, where
`top_p < 1`, the nucleus: the tokens whose probability is at least that of the last token inside top-p (sorted,
the mass before it <= top_p; a token tied with it is kept too), then inverse-CDF sampling with ONE uniform
number per row, drawn on the host from that row's `torch.Generator` (or torch's global generator). So a seed gives
the same tokens on every run, batched or alone, and on CPU and GPU alike up to float64 rounding at a CDF step. The
host decides from its own settings which rows need a softmax or a sort, so the device is never asked.
`IdsInFlight` lets the server's loop queue its next step before it reads these ids (`scheduler.py`): their copy to
pinned host memory and an event are queued right behind the choice, so reading them waits for that step alone.

What it is not: a logits processor chain (no repetition penalty, no top-k).

Test: `python -m pytest tests/test_runtime_sampling.py -q`.
"""

from __future__ import annotations

import torch


CANDIDATES = 1024  # CPU: the nucleus is looked for among this many most likely tokens before sorting them all


def choose_tokens(logits: torch.Tensor, temperatures: list[float], top_ps: list[float],
                  generators: list[torch.Generator | None]) -> list[int]:
    """The next token of each row of `logits [B, vocab]` (any device, any float dtype); settings per row."""
    return choose_on_device(logits, temperatures, top_ps, generators).tolist()  # the one copy to the host


def choose_on_device(logits: torch.Tensor, temperatures: list[float], top_ps: list[float],
                     generators: list[torch.Generator | None]) -> torch.Tensor:
    """`choose_tokens`' ids `[B]` (int64), left on the logits' device; the uniform numbers are drawn now."""
    tokens = logits.argmax(-1)
    sampled = [i for i, temperature in enumerate(temperatures) if temperature > 0]
    if sampled:
        settings = [[temperatures[i] for i in sampled], [top_ps[i] for i in sampled],
                    [float(torch.rand((), dtype=torch.float64, generator=generators[i])) for i in sampled]]
        if len(sampled) == len(temperatures):
            tokens = sample_rows(logits, settings, any(top_p < 1.0 for top_p in settings[1]))
        else:
            index = torch.tensor(sampled, device=logits.device)
            picks = sample_rows(logits[index], settings, any(top_p < 1.0 for top_p in settings[1]))
            tokens = tokens.index_copy(0, index, picks)
    return tokens


class IdsInFlight:
    """Token ids chosen on the device `[B]`, on their way to the host: on CUDA the copy into pinned memory and an
    event are queued now, behind the step that chose them, so `tolist()` later waits for that step only, not for
    work queued after it. Elsewhere the ids are already there."""

    def __init__(self, ids: torch.Tensor):
        self.device_ids = ids
        self.event = None
        if ids.device.type == "cuda":
            self.host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            self.host.copy_(ids, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = ids

    def tolist(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> int:
    """Greedy (temperature 0) or temperature + nucleus sampling from one logits vector `[vocab]`."""
    return choose_tokens(logits.reshape(1, -1), [temperature], [top_p], [generator])[0]


def sample_rows(logits: torch.Tensor, settings: list[list[float]], nucleus: bool) -> torch.Tensor:
    """Inverse-CDF samples `[B]` (on the logits' device) of `logits [B, vocab]`; `settings` = per-row
    temperatures (> 0), top-p values and uniform numbers in [0, 1) (one host-to-device copy); `nucleus`: some
    top-p is below 1."""
    temperature, top_p, uniform = torch.tensor(settings, dtype=torch.float64, device=logits.device)[:, :, None]
    logits = logits.double()
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / temperature, dim=-1)  # max first: no overflow
    if nucleus:
        floor = torch.where(top_p < 1.0, nucleus_floor(probs, top_p), 0.0)
        probs = probs * (probs >= floor)
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).clamp_(max=logits.shape[-1] - 1).squeeze(-1)


def nucleus_floor(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`[B, 1]`: the smallest probability inside each row's nucleus (sorted descending: the tokens whose
    preceding mass is <= top_p `[B, 1]`; the most likely token always). On CPU, where sorting a whole vocabulary
    is slow, the `CANDIDATES` most likely tokens are tried first (the same values: the nucleus lies inside them
    when their mass before the last one exceeds top_p)."""
    if probs.device.type == "cpu" and probs.shape[-1] > CANDIDATES:
        ordered = probs.topk(CANDIDATES, dim=-1).values
        before = ordered.cumsum(-1) - ordered
        if bool(((before[:, -1:] > top_p) | (top_p >= 1.0)).all()):
            return ordered.gather(-1, (before <= top_p).sum(-1, keepdim=True) - 1)
    ordered = probs.sort(dim=-1, descending=True).values
    before = ordered.cumsum(-1) - ordered
    return ordered.gather(-1, (before <= top_p).sum(-1, keepdim=True) - 1)

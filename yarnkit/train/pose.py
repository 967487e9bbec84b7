"""PoSE (Positional Skip-wisE training, arXiv 2309.10400): train long positions with short sequences.

A chunk of `seq_len` tokens is split at a random point into two parts; each part's position ids get a random
skip offset (the second offset >= the first), so the positions span up to `target_len` while the attention
cost stays that of `seq_len`. Positions stay strictly increasing and below `target_len`. The text itself is
contiguous (a simplification of the paper, which also skips text). Offsets are drawn from a generator seeded
by (seed, sample index), so a resumed run sees the same positions. Pure math, no model:
`python -m pytest tests/test_data.py -k pose`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


FAR_MIN = 0.5  # a far row's skip starts at half the room: its question sits half to all of the target away


@dataclass
class PoseArgs:
    enabled: bool = False
    target_len: int = 0  # positions reach up to this length; 0 = the model's YaRN context (max_position_embeddings)
    far_min: float = FAR_MIN  # far rows (data.synthetic.far): the skip is drawn from [far_min x room, room],
    # room = target_len - seq_len; lower it to train shorter far distances too (far_position_ids)


def pose_position_ids(seq_len: int, target_len: int, generator: torch.Generator) -> torch.Tensor:
    """Position ids `[seq_len]` for one chunk: two parts with skip offsets, all in `[0, target_len)`."""
    if target_len < seq_len:
        raise ValueError(f"PoSE target_len={target_len} is shorter than seq_len={seq_len}")
    split = int(torch.randint(1, seq_len, (1,), generator=generator)) if seq_len > 1 else seq_len
    room = target_len - seq_len  # total skip budget
    first = int(torch.randint(0, room + 1, (1,), generator=generator))
    second = int(torch.randint(first, room + 1, (1,), generator=generator))
    positions = torch.arange(seq_len)
    positions[:split] += first
    positions[split:] += second
    return positions


def far_position_ids(seq_len: int, split: int, target_len: int, generator: torch.Generator,
                     far_min: float = FAR_MIN) -> torch.Tensor:
    """Position ids `[seq_len]` for a far row (`yarnkit.train.synthetic`, `Row.far_split`): tokens before `split`
    at 0, 1, ...; from `split` on, shifted by a skip drawn uniformly from [far_min x room, room] (room =
    target_len - seq_len; by default half to all of it), so the question part sits that far after the facts; the
    last position stays below `target_len`."""
    if target_len < seq_len or not 0 < split < seq_len:
        raise ValueError(f"far positions need 0 < split={split} < seq_len={seq_len} <= target_len={target_len}")
    if not 0.0 <= far_min <= 1.0:
        raise ValueError(f"far_min={far_min} must lie in [0, 1]")
    room = target_len - seq_len
    skip = int(torch.randint(int(room * far_min), room + 1, (1,), generator=generator))
    positions = torch.arange(seq_len)
    positions[split:] += skip
    return positions


def pose_generator(seed: int, sample_index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + sample_index)

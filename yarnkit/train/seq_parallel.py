"""Sequence parallelism (`train.sp_size > 1`): DeepSpeed Ulysses through accelerate's `ParallelismConfig`.

The engine is DeepSpeed's (`UlyssesSPAttentionHF`, wired by `accelerator.prepare` when the Accelerator gets
`ParallelismConfig(sp_backend="deepspeed", sp_size=N)`): inside each attention layer an all-to-all turns
"all heads, 1/N of the sequence" into "1/N of the heads, the whole sequence" and back. This module only does
what a custom loop must do around it:

- `check_sequence_parallel`: the constraints, as recipe errors that name the fix (DeepSpeed launch, sp_size
  dividing the process count, the attention heads and the KV heads (or vice versa), and `data.seq_len`;
  an attention backend Ulysses accepts; no packed documents with sdpa).
- `shard_batch`: rank r of an SP group keeps tokens [r*L/N, (r+1)*L/N) of the same sample, with labels shifted
  *before* sharding (the next token of a shard's last position lives on the next rank) and global position ids.
- `combine_loss`: each rank's mean loss over its valid labels, weighted by valid-label counts into the loss of
  the whole sequence (same value on every rank; each rank back-propagates only its own share).

Ranks 0..N-1 form SP group 0, N..2N-1 group 1, ... (DeepSpeed's `parallel_state_sp`); a group is one data-
parallel replica. Not the attention engine itself. Tested by `python -m pytest tests/test_seq_parallel.py`.
"""

from __future__ import annotations

import torch

from yarnkit.errors import RecipeError

ULYSSES_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3")


def check_sequence_parallel(sp_size: int, world: int, text_config, seq_len: int, attn: str, packing: bool = False,
                            deepspeed: bool = True) -> None:
    """Raise a RecipeError naming the constraint and the fix when `sp_size` cannot work; sp_size=1 always can.
    `text_config=None` skips the head checks (the config is read after the launch is set up)."""
    if sp_size < 1:
        raise RecipeError(f"train.sp_size={sp_size}; use 1 (off) or the number of GPUs sharing one sequence")
    if sp_size == 1:
        return
    if not deepspeed:
        raise RecipeError(f"train.sp_size={sp_size} needs a DeepSpeed launch (Ulysses is DeepSpeed's): accelerate "
                          f"launch --config_file recipes/accelerate/zero2.yaml --num_processes {sp_size} ...")
    if world % sp_size:
        raise RecipeError(f"train.sp_size={sp_size} does not divide the {world} processes; use a divisor of {world} "
                     f"or launch a multiple of {sp_size} processes")
    if text_config is not None:  # None: the launch-time check, before the config is read
        heads = text_config.num_attention_heads
        kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
        if heads % sp_size:
            raise RecipeError(f"train.sp_size={sp_size} does not divide the model's {heads} attention heads (Ulysses "
                         f"gives each rank heads/sp_size heads); use a divisor of {heads}")
        if kv_heads % sp_size and sp_size % kv_heads:
            raise RecipeError(f"train.sp_size={sp_size} and the model's {kv_heads} KV heads must divide one another "
                         f"(Ulysses splits or replicates KV heads); use a divisor or multiple of {kv_heads}")
    if seq_len % sp_size:
        raise RecipeError(f"data.seq_len={seq_len} is not divisible by train.sp_size={sp_size}; use a multiple of "
                     f"{sp_size} (a multiple of {256 * sp_size} keeps matmuls efficient)")
    if attn not in ULYSSES_ATTENTION:
        raise RecipeError(f"model.attn_implementation={attn} does not work with Ulysses sequence parallelism; use one of "
                     f"{', '.join(ULYSSES_ATTENTION)}")
    if packing and attn == "sdpa":
        raise RecipeError("data.packing=true with sdpa cannot run under sequence parallelism (DeepSpeed would need an "
                     "O(seq^2) document mask); use model.attn_implementation=flash_attention_2 or data.packing=false")


def parallelism_config(sp_size: int, world: int, seq_len: int, attn: str):
    """accelerate's ParallelismConfig for Ulysses over `sp_size` ranks, the rest data parallel (ZeRO)."""
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    handler = DeepSpeedSequenceParallelConfig(sp_seq_length=seq_len, sp_seq_length_is_variable=False,
                                              sp_attn_implementation=attn)
    return ParallelismConfig(sp_backend="deepspeed", sp_size=sp_size, dp_shard_size=world // sp_size,
                             sp_handler=handler)


def shard_batch(input_ids: torch.Tensor, position_ids: torch.Tensor | None, sp_rank: int, sp_size: int) -> dict:
    """SP rank `sp_rank`'s slice of a [B, L] batch: input_ids, pre-shifted labels (-100 after the last token) and
    global position ids, each [B, L / sp_size]."""
    batch, length = input_ids.shape
    if length % sp_size:
        raise RecipeError(f"a batch of {length} tokens cannot be split over train.sp_size={sp_size}; "
                     f"use a data.seq_len divisible by {sp_size}")
    labels = torch.cat([input_ids[:, 1:], input_ids.new_full((batch, 1), -100)], dim=1)
    if position_ids is None:
        position_ids = torch.arange(length, dtype=torch.long).expand(batch, length)
    piece = slice(sp_rank * length // sp_size, (sp_rank + 1) * length // sp_size)
    return {"input_ids": input_ids[:, piece].contiguous(), "labels": labels[:, piece].contiguous(),
            "position_ids": position_ids[:, piece].contiguous()}


def combine_loss(local_mean: torch.Tensor, local_count: torch.Tensor, group) -> torch.Tensor:
    """Loss over the whole sequence from each SP rank's mean over its `local_count` valid labels.

    The value is the valid-label-weighted mean over the SP group (every rank holds the same number); the
    gradient is only this rank's share `local_mean * local_count / total_count`, because DeepSpeed *sums*
    gradients over the ranks of an SP group (it divides by the data-parallel size only). A differentiable
    all-gather of the losses would count every share sp_size times (tests/test_seq_parallel.py checks the
    gradient norm against one process). Ranks without a valid label contribute 0, not NaN."""
    import torch.distributed as dist

    total = local_count.detach().clone().float()
    dist.all_reduce(total, group=group)
    share = local_mean * local_count / total.clamp(min=1)
    value = share.detach().clone()
    dist.all_reduce(value, group=group)
    return share + (value - share).detach()

"""One launch's training mechanics: the Accelerator (single process, DDP or DeepSpeed ZeRO-2/3, with DeepSpeed
Ulysses under `train.sp_size > 1`) and one micro-batch's loss.

`TrainArgs` is the loop's section of the recipe: steps, batch shape, precision, clipping, logging, the loss kernel
and the sequence-parallel degree. One optimizer step = `grad_accum` micro-batches of `micro_batch_size` chunks on
every process (`global_batch` derives `grad_accum`). `train.mixed_precision=bf16-weights` runs the module in bf16
without autocast and steps float32 masters (`yarnkit.train.master_weights`): accelerate then runs with mixed
precision "no", and a DeepSpeed launch refuses it (DeepSpeed's bf16 is that already); `precision_mode` names what
runs. `Prefetcher` builds the next micro-batch (in pinned memory) on a worker thread while the GPU runs the
current one; the batches and their order are the same as without it.
It is not the run itself (`yarnkit.train.trainer`). Tested by `python -m pytest tests/test_trainer.py
tests/test_seq_parallel.py tests/test_speed.py tests/test_master_weights.py`.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from yarnkit.errors import RecipeError
from yarnkit.recipe_files import deepspeed_json
from yarnkit.train.seq_parallel import check_sequence_parallel, combine_loss, parallelism_config, shard_batch

DEEPSPEED_JSON_ENV = "ACCELERATE_DEEPSPEED_CONFIG_FILE"  # `accelerate launch` passes deepspeed_config_file here


@dataclass
class TrainArgs:
    max_steps: int = 400  # optimizer steps
    micro_batch_size: int = 1  # chunks per process per forward
    grad_accum: int = 8  # micro-batches per optimizer step; global batch = micro x accum x processes
    global_batch: int = 0  # if > 0: chunks per optimizer step; sets grad_accum = global / (micro x processes)
    mixed_precision: str = "bf16"  # fp32 | bf16 | fp16 (autocast, fp32 weights) | bf16-weights (+ fp32 masters)
    clip: float = 1.0  # max global grad norm; 0 = no clipping (the norm is still logged)
    loss_impl: str = "auto"  # auto (Liger's fused linear cross-entropy on CUDA if installed) | liger | chunked
    loss_chunk_tokens: int = 4096  # chunked loss: positions per output-head + cross-entropy chunk
    answer_loss_weight: float = 0.0  # > 0: loss += weight x mean loss on synthetic answers' value tokens (a mix)
    seed: int = 42
    log_every: int = 1
    tensorboard: bool = False  # also write TensorBoard events under run_dir/tb (needs `tensorboard`)
    peak_tflops: float = 989.0  # dense bf16 peak per device (H100/H200) for MFU and dry-run time estimates
    memory_check: bool = True  # stop before loading weights if the memory estimate exceeds the GPU (or host RAM)
    sp_size: int = 1  # sequence parallelism: GPUs sharing one sequence (DeepSpeed Ulysses); 1 = off
    offload_activations: bool = False  # checkpointed layer inputs wait in pinned CPU memory (needs checkpointing)
    profile_step: int = 0  # > 0: torch.profiler over that step; RUN/profile.md lists top kernels and host gaps


def resolve_grad_accum(train_args: TrainArgs, world: int) -> int:
    if not train_args.global_batch:
        return train_args.grad_accum
    per_pass = train_args.micro_batch_size * world // max(train_args.sp_size, 1)  # an SP group is one replica
    if train_args.global_batch % per_pass:
        raise RecipeError(f"train.global_batch={train_args.global_batch} is not a multiple of micro_batch_size x "
                         f"data-parallel replicas = {per_pass}; change the batch or the number of processes")
    return train_args.global_batch // per_pass


def check_precision(train_args: TrainArgs, deepspeed: bool) -> None:
    """`bf16-weights` is the one-process/DDP form of DeepSpeed's bf16: refuse it under DeepSpeed."""
    if deepspeed and train_args.mixed_precision == "bf16-weights":
        raise RecipeError("train.mixed_precision=bf16-weights is for one-process and DDP launches (DeepSpeed's bf16 "
                          "already keeps bf16 weights with float32 masters)",
                          "use train.mixed_precision=bf16 under DeepSpeed")


def precision_mode(mixed_precision: str, deepspeed: bool) -> str:
    """What runs, in words: the `precision` key of RUN/speed.json and of the benchmark rows."""
    if mixed_precision == "fp32":
        return "fp32"
    if mixed_precision == "bf16-weights":
        return "bf16 weights, fp32 masters (yarnkit)"
    if deepspeed:
        return f"{mixed_precision} weights, fp32 masters (DeepSpeed)"
    return f"{mixed_precision} autocast, fp32 weights"


def make_accelerator(train_args: TrainArgs, seq_len: int = 0, attn: str = "sdpa"):
    """The Accelerator for this launch; resolves `train_args.grad_accum` from `global_batch` in place. With
    `train_args.sp_size > 1` it carries accelerate's ParallelismConfig for DeepSpeed Ulysses over `seq_len`."""
    from accelerate import Accelerator, PartialState

    # Without CUDA: cpu=True makes a `--multi_gpu` launch run gloo processes (accelerate's MULTI_CPU); under
    # DeepSpeed, accelerate only counts the processes when given a backend, so name gloo explicitly.
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    check_precision(train_args, deepspeed)
    if os.environ.get(DEEPSPEED_JSON_ENV):  # a launcher config's `recipes/accelerate/X.json`, found from any folder
        os.environ[DEEPSPEED_JSON_ENV] = deepspeed_json(os.environ[DEEPSPEED_JSON_ENV])
    cpu = not torch.cuda.is_available() and not deepspeed
    extra = {"backend": "gloo"} if deepspeed and not torch.cuda.is_available() else {}
    world = PartialState(cpu=cpu, **extra).num_processes
    train_args.grad_accum = resolve_grad_accum(train_args, world)
    parallel = {}
    if train_args.sp_size != 1:
        check_sequence_parallel(train_args.sp_size, world, None, seq_len, attn, deepspeed=deepspeed)
        parallel["parallelism_config"] = parallelism_config(train_args.sp_size, world, seq_len, attn)
    precision = "no" if train_args.mixed_precision in ("fp32", "bf16-weights") else train_args.mixed_precision
    accelerator = Accelerator(mixed_precision=precision, cpu=cpu,
                              gradient_accumulation_steps=train_args.grad_accum,
                              step_scheduler_with_optimizer=False, **parallel)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:  # fill DeepSpeed's batch/clip fields from the recipe (no dataloader to infer them)
        config = plugin.deepspeed_config
        config["train_micro_batch_size_per_gpu"] = train_args.micro_batch_size
        config["gradient_accumulation_steps"] = train_args.grad_accum
        config.pop("train_batch_size", None)  # DeepSpeed derives it: micro x accum x world
        config["gradient_clipping"] = train_args.clip
    return accelerator


def zero_stage(accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage) if plugin is not None else 0


def forward_loss(wrapper, batch: dict, device, sp_rank: int, sp: int, sp_group) -> torch.Tensor:
    """The micro-batch's mean loss; under sequence parallelism this rank's shard, combined over its SP group."""
    if sp == 1:
        extra = {k: batch[k].to(device, non_blocking=True) for k in ("position_ids", "attention_mask", "answer_positions")
                 if batch.get(k) is not None}
        return wrapper(batch["input_ids"].to(device, non_blocking=True), **extra)
    # Ulysses attends causally over the gathered sequence and drops masks: PoSE's all-ones mask is not needed
    shard = {k: v.to(device) for k, v in shard_batch(batch["input_ids"], batch["position_ids"], sp_rank, sp).items()}
    local = wrapper(shard["input_ids"], position_ids=shard["position_ids"], labels=shard["labels"])
    return combine_loss(local, (shard["labels"] != -100).sum(), sp_group)


class Prefetcher:
    """`prefetcher(first, following)` returns `build(first)` and starts building `build(following)` on a worker
    thread (None: nothing follows). Tensors are pinned when `pin`, so `.to(device, non_blocking=True)` overlaps."""

    TENSORS = ("input_ids", "position_ids", "attention_mask", "answer_positions")

    def __init__(self, build, pin: bool):
        self.build, self.pin = build, pin
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="yarnkit-batches")
        self.ahead = None  # (first sample, future)

    def _make(self, first: int) -> dict:
        batch = self.build(first)
        if self.pin:
            batch.update({k: batch[k].pin_memory() for k in self.TENSORS if batch.get(k) is not None})
        return batch

    def __call__(self, first: int, following: int | None) -> dict:
        ahead, self.ahead = self.ahead, None
        batch = ahead[1].result() if ahead is not None and ahead[0] == first else None
        if batch is None:
            if ahead is not None:
                ahead[1].result()  # one build at a time: the sample order object is not thread-safe
            batch = self._make(first)
        if following is not None:
            self.ahead = (following, self.pool.submit(self._make, following))
        return batch

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def sequence_parallel_group():
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    return parallel_state_sp.get_sequence_parallel_group()


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB: host RSS

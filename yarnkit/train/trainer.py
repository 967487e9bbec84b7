"""The training run: accelerate (single process, DDP or DeepSpeed ZeRO-2/3) around a YaRN-scaled causal LM.

    from yarnkit.train.recipe import load_recipe
    result = train(load_recipe(["recipe=tiny", "train.max_steps=3"]))   # one process (CPU or one GPU)

One optimizer step = `grad_accum` micro-batches of `micro_batch_size` chunks on every process. The loss is the
cross-entropy of `yarnkit.train.loss` (fused or chunked, `train.loss_impl`); gradients are clipped to `train.clip`
and the logged `grad_norm` is the norm *before* clipping. The loop never waits for the GPU inside a step: the next
micro-batch is built on a worker thread (`loop.Prefetcher`) and step k's loss is read (one sync) only after
step k+1 has been queued, so logging costs no GPU idle time; on a GPU `step_seconds` is the time between CUDA
events recorded at the ends of consecutive steps (host gaps included), on a CPU the step's wall time.
Checkpoints (`yarnkit.train.checkpoint`) hold the full state, so `resume=auto` reproduces an uninterrupted run
exactly. `train.mixed_precision=bf16-weights` trains a bf16 module whose float32 masters AdamW steps
(`yarnkit.train.master_weights`: gradients summed in float32, one float32 all-reduce under DDP, checkpoints of
the masters). `RUN/speed.json` records which kernels and precision run after fallbacks. It is not the recipe parser
(`yarnkit.train.recipe`), the data builder (`yarnkit.train.data`) nor the command (`yarnkit.train.cli`). Tested by
`python -m pytest tests/test_trainer.py tests/test_distributed.py tests/test_speed.py tests/test_master_weights.py`.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from yarnkit import rope
from yarnkit.errors import AlreadyExists, NotFound, RecipeError
from yarnkit.models import host_memory_bytes
from yarnkit.outputs import check_output_dir
from yarnkit.runs import has_step_dirs, is_complete, latest_checkpoint
from yarnkit.train.checkpoint import load_checkpoint, save_checkpoint
from yarnkit.train.data import SampleOrder, build_dataset, micro_batch, source_fingerprint
from yarnkit.train.estimate import check_memory, flops_per_token
from yarnkit.train.loop import (Prefetcher, forward_loss, make_accelerator, peak_memory_gb, precision_mode,
                                sequence_parallel_group, zero_stage)
from yarnkit.train.loss import CausalLMLoss, fused_loss_missing
from yarnkit.train.master_weights import MasterWeights
from yarnkit.train.metrics import MetricsLog, StageClock
from yarnkit.train.model_setup import build_model, scaled_config
from yarnkit.train.optim import build_optimizer
from yarnkit.train.recipe import check_context, recipe_from_file, recipe_to_yaml, save_recipe
from yarnkit.train.seq_parallel import check_sequence_parallel
from yarnkit.train.profiling import step_profile, summary
from yarnkit.train.speed import activation_offload, resolve_choice


@dataclass
class TrainResult:
    run_dir: str
    first_step: int  # 1-based step this process started at (after resume)
    last_step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss averaged over the global batch
    samples: list[int] = field(default_factory=list)  # global sample numbers this process consumed
    world_size: int = 1
    rank: int = 0
    distributed_type: str = "NO"  # accelerate's: NO, MULTI_CPU, MULTI_GPU, DEEPSPEED
    model: object = None  # the trained model (peft or transformers), unwrapped; full weights only without ZeRO-3


def _resume_point(recipe, run_dir: Path):
    if recipe.resume == "auto":
        return latest_checkpoint(run_dir)
    if recipe.resume in ("none", ""):
        if has_step_dirs(run_dir):
            raise AlreadyExists(f"resume={recipe.resume} but {run_dir} already has checkpoints",
                              "continue them with resume=auto, or pick a new run_dir=...")
        return None
    path = Path(recipe.resume)
    if not is_complete(path):
        raise NotFound(f"resume={path} is not a complete checkpoint (no model/ and state/trainer_state.json inside)",
                       "pass a RUN/checkpoints/step_NNNNNN folder, or resume=auto")
    return path


def check_resumable(recipe, checkpoint: Path) -> None:
    """Refuse to continue a checkpoint whose model, scaling, adapters or sequence length differ from the recipe."""
    saved = recipe_from_file(checkpoint / "recipe.yaml")
    pairs = {"model.name_or_path": (saved.model.name_or_path, recipe.model.name_or_path),
             "model.init/sink_token": ((saved.model.init, saved.model.scratch, saved.model.sink_token),
                                       (recipe.model.init, recipe.model.scratch, recipe.model.sink_token)),
             "yarn": (saved.yarn, recipe.yarn),
             "lora": (saved.lora, recipe.lora), "data.seq_len": (saved.data.seq_len, recipe.data.seq_len)}
    changed = [key for key, (old, new) in pairs.items() if old != new]
    if changed:
        raise RecipeError(f"{checkpoint} was trained with different {', '.join(changed)} settings than this recipe; "
                         f"start a new run (run_dir=... resume=none) or restore those settings")


def train(recipe) -> TrainResult:
    """Run (or continue) the recipe's training; returns what this process did."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    stages = StageClock()
    args, run_dir = recipe.train, Path(recipe.run_dir)
    check_output_dir(run_dir, "run_dir=")  # a run that could not save its checkpoints fails now, not after training
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # peak_memory_gb is this run's, also when a process runs several
    accelerator = make_accelerator(args, recipe.data.seq_len, recipe.model.attn_implementation)
    rank, world = accelerator.process_index, accelerator.num_processes
    sp = args.sp_size  # an SP group of `sp` consecutive ranks is one data-parallel replica
    dp_rank, dp_world = rank // sp, world // sp
    resume_from = _resume_point(recipe, run_dir)
    if resume_from is not None:
        check_resumable(recipe, resume_from)
    with accelerator.main_process_first():  # the first read of a bundled GGUF converts and caches it once
        config = scaled_config(recipe.model, recipe.yarn)
    check_context(recipe, config)
    check_sequence_parallel(sp, world, config.get_text_config(), recipe.data.seq_len,
                            recipe.model.attn_implementation, recipe.data.packing, zero_stage(accelerator) > 0)
    source_fingerprint(recipe.data)  # a missing data path fails here, before any weights load
    if args.memory_check and torch.cuda.is_available():
        check_memory(recipe, config, world, zero_stage(accelerator), torch.cuda.get_device_properties(0).total_memory)
    elif args.memory_check:  # CPU: every process of this launch shares the machine's memory
        check_memory(recipe, config, world, zero_stage(accelerator), host_memory_bytes() // world)
    set_seed(args.seed)
    stages.lap("set-up")
    model, tokenizer = build_model(recipe.model, config, recipe.lora,  # all ranks together: ZeRO-3 init
                                   init_device=str(accelerator.device) if zero_stage(accelerator) < 3 else None)
    stages.lap("model load")
    with accelerator.main_process_first():  # rank 0 tokenizes and caches; the others then read the cache
        sink_id = getattr(model.config, "yarnkit_sink_token_id", None) if recipe.model.sink_token else None
        dataset = build_dataset(recipe.data, tokenizer, sink_id, arrays=True)
    stages.lap("data")
    if accelerator.is_main_process:
        save_recipe(recipe, run_dir)
    fused_loss = resolve_choice("train.loss_impl", args.loss_impl, fused_loss_missing(model, zero_stage(accelerator)),
                                "liger", "chunked")
    speed = {**getattr(model, "yarnkit_speed", {}), "loss": "liger fused linear cross-entropy" if fused_loss
             else f"chunked ({args.loss_chunk_tokens} tokens)"}
    wrapper = CausalLMLoss(model, args.loss_chunk_tokens, fused=fused_loss, answer_weight=args.answer_loss_weight)
    masters = None
    if args.mixed_precision == "bf16-weights":  # the module in bf16 on its device; AdamW steps float32 masters
        masters = MasterWeights(wrapper.to(accelerator.device).parameters())
    optimizer, scheduler = build_optimizer(masters.masters if masters else wrapper.parameters(), recipe.optim,
                                           args.max_steps, accelerator.device)
    speed["optimizer"] = "AdamW " + ("fused" if optimizer.defaults.get("fused") else "foreach")
    speed["precision"] = precision_mode(args.mixed_precision, accelerator.state.deepspeed_plugin is not None)
    if accelerator.is_main_process:
        print("yarnkit: speed: " + ", ".join(f"{key}={value}" for key, value in speed.items()), flush=True)
        (run_dir / "speed.json").write_text(json.dumps(speed, indent=1))
    wrapper, optimizer, scheduler = accelerator.prepare(wrapper, optimizer, scheduler)
    sp_group = sequence_parallel_group() if sp > 1 else None

    state = {"step": 0, "samples_seen": 0, "tokens_seen": 0}
    if resume_from is not None:
        with float32_weights(masters):
            state = load_checkpoint(accelerator, resume_from)
    log = MetricsLog(run_dir, accelerator.is_main_process, args.tensorboard, truncate_after=state["step"])
    order = SampleOrder(len(dataset), recipe.data.seed, recipe.data.shuffle)
    pose_target = (recipe.pose.target_len or config.max_position_embeddings) if recipe.pose.enabled else 0
    per_step = args.micro_batch_size * args.grad_accum * dp_world
    text = config.get_text_config()
    head_dim = rope.head_dim(text)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3: full sizes
    flops_token = flops_per_token(n_params, text.num_hidden_layers,
                                  text.num_attention_heads, head_dim, recipe.data.seq_len)
    result = TrainResult(str(run_dir), state["step"] + 1, state["step"], world_size=world, rank=rank,
                         distributed_type=str(accelerator.distributed_type.value))
    bar = tqdm(total=args.max_steps, initial=state["step"], disable=not accelerator.is_main_process,
               desc="train", unit="step", dynamic_ncols=True)
    ds_engine = zero_stage(accelerator) > 0
    offload = activation_offload(args.offload_activations)  # one instance: its pinned buffers are reused
    cuda = accelerator.device.type == "cuda"
    prefetch = Prefetcher(lambda first: micro_batch(dataset, order, first, dp_rank, dp_world, args.micro_batch_size,
                                                    pose_target, recipe.data.seed, sink_first=sink_id is not None,
                                                    far_min=recipe.pose.far_min),
                          pin=cuda)
    stride = dp_world * args.micro_batch_size  # samples between this rank's consecutive micro-batches
    clock = {"last": _mark(cuda)}  # GPU: an event at the end of the previous step; the step time is between two
    stages.lap("optimizer, prepare and resume")

    def finish(done: dict) -> None:
        """Read step `done`'s loss (waits for that step only) and log it."""
        step_loss = done["loss"].item()
        seconds = done["seconds"] or clock["last"].elapsed_time(done["end"]) / 1e3
        clock["last"] = done["end"]
        number = done["step"]
        result.losses[number], result.last_step = step_loss, number
        tokens_per_s = per_step * recipe.data.seq_len / seconds
        if number % args.log_every == 0 or number == args.max_steps:
            log.write(dict(step=number, loss=step_loss, lr=done["lr"], grad_norm=float(done["grad_norm"] or 0.0),
                           tokens_per_s=tokens_per_s, tokens_per_s_per_device=tokens_per_s / world,
                           mfu=tokens_per_s / world * flops_token / (args.peak_tflops * 1e12),
                           step_seconds=seconds, tokens_seen=done["tokens_seen"], world_size=world,
                           peak_memory_gb=peak_memory_gb()))
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        bar.update(1)

    pending = None
    for step in range(state["step"], args.max_steps):
        profiled = step + 1 == args.profile_step
        if profiled and cuda:
            torch.cuda.synchronize()  # the profile holds this step's kernels only
        with step_profile(profiled) as prof:
            started = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            loss_sum, grad_norm = torch.zeros((), device=accelerator.device), None
            for micro in range(args.grad_accum):
                first = state["samples_seen"] + micro * stride
                last = step + 1 == args.max_steps and micro + 1 == args.grad_accum
                batch = prefetch(first, None if last else first + stride)
                result.samples.extend(batch["samples"])
                # bf16-weights: DDP never reduces the bf16 grads; the masters' float32 grads are, once per step
                sync = accelerator.no_sync(wrapper) if masters is not None else accelerator.accumulate(wrapper)
                with sync, offload:
                    loss = forward_loss(wrapper, batch, accelerator.device, rank % sp, sp, sp_group)
                    accelerator.backward(loss)
                    if masters is None:  # bf16-weights: the backward added the grads into the float32 masters
                        if accelerator.sync_gradients and not ds_engine:
                            grad_norm = accelerator.clip_grad_norm_(wrapper.parameters(), args.clip or math.inf)
                        optimizer.step()
                        optimizer.zero_grad()
                loss_sum += loss.detach() / args.grad_accum
            if masters is not None:
                masters.reduce(world)
                grad_norm = masters.clip(args.clip or math.inf)
                optimizer.step()
                masters.publish()
            if ds_engine:
                grad_norm = wrapper.get_global_grad_norm()
            scheduler.step()
            if profiled and cuda:
                torch.cuda.synchronize()
        state["step"] = step + 1
        state["samples_seen"] += per_step
        state["tokens_seen"] += per_step * recipe.data.seq_len
        done = {"step": step + 1, "loss": accelerator.reduce(loss_sum, reduction="mean"), "lr": lr,
                "grad_norm": grad_norm, "tokens_seen": state["tokens_seen"], "end": _mark(cuda),
                "seconds": None if cuda and not profiled else time.perf_counter() - started}  # CPU: synchronous
        if pending is not None:
            finish(pending)  # the previous step's numbers: this step is already queued behind them
        pending = done
        if profiled:
            if accelerator.is_main_process:
                (run_dir / "profile.md").write_text(summary(prof, pending["seconds"], f"step {step + 1} of "
                                                            f"{recipe.run_dir}: {recipe.data.seq_len} tokens x "
                                                            f"{args.micro_batch_size}"))
        every = recipe.checkpoint.every
        save = (every and (step + 1) % every == 0) or (step + 1 == args.max_steps and recipe.checkpoint.save_final)
        if save or step + 1 == args.max_steps:
            finish(pending)
            pending = None
        if save:
            stages.lap("steps")  # the steps' kernels are done: finish() read the last loss
            with float32_weights(masters):
                save_checkpoint(accelerator, wrapper, tokenizer, run_dir, step + 1, state, recipe_to_yaml(recipe),
                                recipe.checkpoint.keep_last)
            stages.lap("checkpoint saves")
    prefetch.close()
    bar.close()
    log.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    stages.lap("steps")
    if accelerator.is_main_process:
        print(f"yarnkit: {stages.line()}", flush=True)
        stages.write(run_dir)
    if masters is not None:
        masters.release()
    result.model = accelerator.unwrap_model(wrapper).model
    return result


def float32_weights(masters: MasterWeights | None):
    """Checkpoints hold float32 weights: the masters under `bf16-weights`, the module's own otherwise."""
    return masters.float32_weights() if masters is not None else nullcontext()


def _mark(cuda: bool):
    """A recorded CUDA event (timing enabled), or None on CPU."""
    if not cuda:
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event

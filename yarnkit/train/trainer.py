"""The training run: accelerate (single process, DDP or DeepSpeed ZeRO-2/3) around a YaRN-scaled causal LM.

    python scripts/train.py recipe=tiny                                   # one process (CPU or one GPU)
    accelerate launch --config_file recipes/accelerate/zero3.yaml scripts/train.py recipe=yarn-64k

One optimizer step = `grad_accum` micro-batches of `micro_batch_size` chunks on every process. The loss is the
chunked cross-entropy of `yarnkit.train.loss`; gradients are clipped to `train.clip` and the logged `grad_norm`
is the norm *before* clipping. Checkpoints (`yarnkit.train.checkpoint`) hold the full state, so `resume=auto`
reproduces an uninterrupted run exactly. It is not the recipe parser (`yarnkit.train.recipe`) nor the data
builder (`yarnkit.train.data`). Tested by `python -m pytest tests/test_trainer.py tests/test_distributed.py`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from yarnkit.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from yarnkit.train.data import SampleOrder, build_dataset, micro_batch, source_fingerprint
from yarnkit.train.errors import DataError, RecipeError
from yarnkit.train.estimate import check_memory, dry_run, flops_per_token
from yarnkit.train.loop import forward_loss, make_accelerator, peak_memory_gb, sequence_parallel_group, zero_stage
from yarnkit.train.loss import CausalLMLoss
from yarnkit.train.metrics import MetricsLog
from yarnkit.train.model import build_model, scaled_config
from yarnkit.train.optim import build_optimizer
from yarnkit.train.recipe import check_context, load_recipe, recipe_from_file, recipe_to_yaml, save_recipe
from yarnkit.train.seq_parallel import check_sequence_parallel
from yarnkit.train.speed import activation_offload


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
        if list_checkpoints(run_dir):
            raise FileExistsError(f"{run_dir} already has checkpoints; continue with resume=auto, or pick a new "
                                  f"run_dir=...")
        return None
    path = Path(recipe.resume)
    if not (path / "state").is_dir():
        raise FileNotFoundError(f"resume={path} is not a checkpoint directory (no state/ inside)")
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

    args, run_dir = recipe.train, Path(recipe.run_dir)
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
    set_seed(args.seed)
    model, tokenizer = build_model(recipe.model, config, recipe.lora,  # all ranks together: ZeRO-3 init
                                   init_device=str(accelerator.device) if zero_stage(accelerator) < 3 else None)
    with accelerator.main_process_first():  # rank 0 tokenizes and caches; the others then read the cache
        sink_id = getattr(model.config, "yarnkit_sink_token_id", None) if recipe.model.sink_token else None
        dataset = build_dataset(recipe.data, tokenizer, sink_id)
    if accelerator.is_main_process:
        save_recipe(recipe, run_dir)
    wrapper = CausalLMLoss(model, args.loss_chunk_tokens)
    optimizer, scheduler = build_optimizer(wrapper.parameters(), recipe.optim, args.max_steps)
    wrapper, optimizer, scheduler = accelerator.prepare(wrapper, optimizer, scheduler)
    sp_group = sequence_parallel_group() if sp > 1 else None

    state = {"step": 0, "samples_seen": 0, "tokens_seen": 0}
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from)
    log = MetricsLog(run_dir, accelerator.is_main_process, args.tensorboard, truncate_after=state["step"])
    order = SampleOrder(len(dataset), recipe.data.seed, recipe.data.shuffle)
    pose_target = (recipe.pose.target_len or config.max_position_embeddings) if recipe.pose.enabled else 0
    per_step = args.micro_batch_size * args.grad_accum * dp_world
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3: full sizes
    flops_token = flops_per_token(n_params, text.num_hidden_layers,
                                  text.num_attention_heads, head_dim, recipe.data.seq_len)
    result = TrainResult(str(run_dir), state["step"] + 1, state["step"], world_size=world, rank=rank,
                         distributed_type=str(accelerator.distributed_type.value))
    bar = tqdm(total=args.max_steps, initial=state["step"], disable=not accelerator.is_main_process,
               desc="train", unit="step", dynamic_ncols=True)
    ds_engine = zero_stage(accelerator) > 0
    offload = activation_offload(args.offload_activations)  # one instance: its pinned buffers are reused
    for step in range(state["step"], args.max_steps):
        started = time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        loss_sum, grad_norm = torch.zeros((), device=accelerator.device), None
        for micro in range(args.grad_accum):
            first = state["samples_seen"] + micro * dp_world * args.micro_batch_size
            batch = micro_batch(dataset, order, first, dp_rank, dp_world, args.micro_batch_size, pose_target,
                                recipe.data.seed, sink_first=sink_id is not None)
            result.samples.extend(batch["samples"])
            with accelerator.accumulate(wrapper), offload:
                loss = forward_loss(wrapper, batch, accelerator.device, rank % sp, sp, sp_group)
                accelerator.backward(loss)
                if accelerator.sync_gradients and not ds_engine:
                    grad_norm = accelerator.clip_grad_norm_(wrapper.parameters(), args.clip or math.inf)
                optimizer.step()
                optimizer.zero_grad()
            loss_sum += loss.detach() / args.grad_accum
        if ds_engine:
            grad_norm = wrapper.get_global_grad_norm()
        scheduler.step()
        state["step"] = step + 1
        state["samples_seen"] += per_step
        state["tokens_seen"] += per_step * recipe.data.seq_len
        step_loss = accelerator.reduce(loss_sum, reduction="mean").item()
        result.losses[step + 1], result.last_step = step_loss, step + 1
        seconds = time.perf_counter() - started
        tokens_per_s = per_step * recipe.data.seq_len / seconds
        if (step + 1) % args.log_every == 0 or step + 1 == args.max_steps:
            log.write(dict(step=step + 1, loss=step_loss, lr=lr, grad_norm=float(grad_norm or 0.0),
                           tokens_per_s=tokens_per_s, tokens_per_s_per_device=tokens_per_s / world,
                           mfu=tokens_per_s / world * flops_token / (args.peak_tflops * 1e12),
                           step_seconds=seconds, tokens_seen=state["tokens_seen"], world_size=world,
                           peak_memory_gb=peak_memory_gb()))
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        bar.update(1)
        every = recipe.checkpoint.every
        if (every and (step + 1) % every == 0) or (step + 1 == args.max_steps and recipe.checkpoint.save_final):
            save_checkpoint(accelerator, wrapper, tokenizer, run_dir, step + 1, state, recipe_to_yaml(recipe),
                            recipe.checkpoint.keep_last)
    bar.close()
    log.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    result.model = accelerator.unwrap_model(wrapper).model
    return result


def add_arguments(parser) -> None:
    """`yarnkit train recipe=tiny key=value ...` (the CLI's entry; same as scripts/train.py)."""
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe=NAME, then recipe overrides")
    parser.add_argument("--dry-run", action="store_true", help="print the recipe and estimates, then stop")


def run(args) -> int:
    return main(list(args.overrides) + (["dry_run=true"] if args.dry_run else []))


def main(argv: list[str] | None = None) -> int:
    """`scripts/train.py` and `yarnkit train`: parse `key=value` overrides, then dry-run or train."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    argv = ["dry_run=true" if a == "--dry-run" else a for a in argv]
    try:
        recipe = load_recipe(argv)
        if recipe.dry_run:
            print(recipe_to_yaml(recipe))
            print(json.dumps(dry_run(recipe, int(os.environ.get("WORLD_SIZE", "1"))), indent=2))
            return 0
        result = train(recipe)
    except (RecipeError, DataError, OSError, MemoryError) as err:  # bad input: the message says what to fix
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result.rank != 0:
        return 0
    if result.last_step >= result.first_step:
        print(f"trained steps {result.first_step}..{result.last_step}; last loss "
              f"{result.losses[result.last_step]:.4f}; outputs in {result.run_dir}")
    else:
        print(f"nothing to do: {result.run_dir} is already at step {result.last_step} (train.max_steps)")
    return 0

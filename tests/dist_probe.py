"""Run under `accelerate launch`: train a recipe, then write what this rank saw to RUN/rank<N>.json.

Not a test file; tests/test_distributed.py, tests/test_seq_parallel.py and tests/test_zero3_resume.py launch it
with 2 CPU processes. Besides the samples, losses, a weight hash and the rendezvous port, a DeepSpeed launch
records what its engine really ran: the ZeRO optimizer class and whether parameters and optimizer states were
offloaded.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

from accelerate import Accelerator

from yarnkit.train.recipe import load_recipe
from yarnkit.train.trainer import train

ENGINES = []  # what Accelerator.prepare returned first: the DeepSpeed engine (or the DDP/plain module)
_prepare = Accelerator.prepare


def _recording_prepare(self, *objects, **kwargs):
    prepared = _prepare(self, *objects, **kwargs)
    ENGINES.append(prepared[0] if isinstance(prepared, tuple) else prepared)
    return prepared


def engine_report() -> dict:
    optimizer = getattr(ENGINES[0], "optimizer", None) if ENGINES else None
    if optimizer is None or not hasattr(optimizer, "offload_param"):
        return {}
    return {"zero_optimizer": type(optimizer).__name__, "offload_param": bool(optimizer.offload_param),
            "offload_optimizer": bool(optimizer.offload_optimizer),
            "inner_optimizer": type(getattr(optimizer, "optimizer", None)).__name__}


if __name__ == "__main__":
    Accelerator.prepare = _recording_prepare
    result = train(load_recipe(sys.argv[1:]))
    digest, hashed = hashlib.sha256(), 0  # under ZeRO-3 each rank holds only shards: nothing to hash here
    for _, param in sorted(result.model.named_parameters()):
        digest.update(param.detach().float().contiguous().numpy().tobytes())
        hashed += param.numel()
    report = {"rank": result.rank, "world_size": result.world_size, "distributed_type": result.distributed_type,
              "samples": result.samples, "losses": result.losses, "weights_sha256": digest.hexdigest(),
              "hashed_elements": hashed, "first_step": result.first_step,
              "master_port": os.environ.get("MASTER_PORT"), **engine_report()}
    Path(result.run_dir, f"rank{result.rank}.json").write_text(json.dumps(report))

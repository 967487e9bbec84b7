"""Run under `accelerate launch`: train a recipe, then write what this rank saw to RUN/rank<N>.json.

Not a test file; tests/test_distributed.py launches it with 2 CPU processes.
"""

import hashlib
import json
import sys
from pathlib import Path

from yarnkit.train.recipe import load_recipe
from yarnkit.train.trainer import train

if __name__ == "__main__":
    result = train(load_recipe(sys.argv[1:]))
    digest, hashed = hashlib.sha256(), 0  # under ZeRO-3 each rank holds only shards: nothing to hash here
    for _, param in sorted(result.model.named_parameters()):
        digest.update(param.detach().float().contiguous().numpy().tobytes())
        hashed += param.numel()
    report = {"rank": result.rank, "world_size": result.world_size, "distributed_type": result.distributed_type,
              "samples": result.samples, "losses": result.losses, "weights_sha256": digest.hexdigest(),
              "hashed_elements": hashed}
    Path(result.run_dir, f"rank{result.rank}.json").write_text(json.dumps(report))

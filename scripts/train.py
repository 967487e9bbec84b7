"""Train a recipe: YaRN context extension with accelerate (one process, DDP or DeepSpeed ZeRO).

    python scripts/train.py recipe=tiny                                     # CPU, a few minutes
    accelerate launch scripts/train.py recipe=tiny                           # same through accelerate
    accelerate launch --config_file recipes/accelerate/zero3.yaml scripts/train.py recipe=yarn-64k \
        data.source=/data/pg19/train
    python scripts/train.py recipe=yarn-64k --dry-run                        # recipe, parameters, estimates

Overrides are `key=value` (see docs/recipes.md); `resume=auto` (the default) continues the last checkpoint.
"""

import sys

from yarnkit.train.trainer import main

if __name__ == "__main__":
    sys.exit(main())

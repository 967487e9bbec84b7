"""Train a recipe: YaRN context extension with accelerate (one process, DDP or DeepSpeed ZeRO).

    python scripts/train.py recipe=tiny                                     # CPU, a few minutes
    accelerate launch scripts/train.py recipe=tiny                           # same through accelerate
    accelerate launch --config_file recipes/accelerate/zero3.yaml scripts/train.py recipe=yarn-64k \
        data.source=/data/pg19/train
    python scripts/train.py recipe=yarn-64k --dry-run                        # recipe, parameters, estimates
    python scripts/train.py --help                                           # every recipe key and its default

Overrides are `key=value` (see docs/recipes.md); `resume=auto` (the default) continues the last checkpoint.
Same as `yarnkit train ...`, through the same error boundary (one-line errors; --debug for the traceback).
"""

import sys

from yarnkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

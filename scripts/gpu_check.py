"""Run every GPU-only path of yarnkit once and report pass/fail per path (yarnkit/bench/gpu_check.py).

    python scripts/gpu_check.py --out runs/gpu-check          # on one H100/H200, about 3 minutes
    python scripts/gpu_check.py --cpu-smoke --out /tmp/gc     # the same paths at tiny sizes on CPU

Writes OUT/gpu_check.json, prints a table, exits 1 when a path failed (docs/training.md, "The GPU check").
"""

import sys

from yarnkit.bench.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())

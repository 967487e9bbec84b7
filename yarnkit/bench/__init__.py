"""Benchmarks, the reference numbers extended models are held to, and the GPU check; nothing else in yarnkit
imports this package.

    training        the training-speed comparison (`python -m yarnkit.bench.training`, scripts/bench_train.py)
    training_cases  one case `MODEL@SHAPE@VARIANT` -> its command line; a group's process runs its cases
    training_table  the peers and variants, and the comparison's tables (MFU, speed-ups, loss agreement)
    hf_peer         the peers: plain transformers (+ Liger-Kernel) (`python -m yarnkit.bench.hf_peer`)
    scaling         one recipe on 1, 2, 4.. processes (`python -m yarnkit.bench.training --gpus 1,2,4`)
    streaming       the streaming runtime's timings: decode latency, peers, batching (scripts/bench_runtime.py)
    lone_session    a lone session's decode speed in each cache row of a full pool
                    (`python -m yarnkit.bench.lone_session`)
    serve_load      `yarnkit serve` under load with the official openai client: time to first token and gaps
                    between tokens for N streams, with and without a long prompt (`python -m yarnkit.bench.serve_load`)
    baselines       the zero-shot baselines an extended model is compared with, and the evaluation books
    targets         the targets an extended model must meet, read from `yarnkit eval` results (scripts/e2e.py)
    recipe_shapes   the small shape of each shipped recipe (the CPU recipe test and the GPU check train with it)
    gpu_paths       one GPU path per process: runs it at a small size, then checks what it wrote
    gpu_check       every GPU path in its own process within a time budget -> one JSON + a pass/fail table
                    (scripts/gpu_check.py)
"""

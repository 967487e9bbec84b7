"""Benchmarks and the reference numbers extended models are held to; nothing else in yarnkit imports this package.

    training        the training-speed comparison (`python -m yarnkit.bench.training`, scripts/bench_train.py)
    training_cases  one case `MODEL@SHAPE@VARIANT` -> its command line; a group's process runs its cases
    training_table  the peers and variants, and the comparison's tables (MFU, speed-ups, loss agreement)
    hf_peer         the peers: plain transformers (+ Liger-Kernel) (`python -m yarnkit.bench.hf_peer`)
    scaling         one recipe on 1, 2, 4.. processes (`python -m yarnkit.bench.training --gpus 1,2,4`)
    streaming       the streaming runtime's timings: decode latency, peers, batching (scripts/bench_runtime.py)
    baselines       the zero-shot baselines an extended model is compared with, and the evaluation books
    targets         the targets an extended model must meet, read from `yarnkit eval` results (scripts/e2e.py)
"""

"""The training side of yarnkit, one module per stage, imports going one way down this list:

    errors        RecipeError, DataError (a leaf)
    corpus        read documents: .txt/.gz files, folders, .jsonl fields
    pose          PoSE position skipping (PoseArgs; pure)
    data          documents -> BOS/EOS tokens -> seq_len chunks (DataArgs; cached); resumable sample order
    speed         speed and memory knobs: attention backend, SDPA kernel, compiled layers, TiledMLP, offload
    model         the model to train: load or build, YaRN config, sink token, LoRA, checkpointing (ModelArgs, ...)
    seq_parallel  DeepSpeed Ulysses sequence parallelism: checks, sharding, loss
    loss          chunked cross-entropy (training) and per-token NLL (evaluation)
    optim         AdamW + warmup/linear schedule (OptimArgs)
    checkpoint    atomic step_NNNNNN checkpoints, keep-last-N, exact resume (CheckpointArgs)
    metrics       metrics.jsonl (+ TensorBoard)
    loop          one launch's accelerator and one micro-batch's loss (TrainArgs)
    recipe        Recipe = every section's *Args; defaults < YAML < key=value; strict keys and cross-checks
    estimate      FLOPs/memory/time estimates for --dry-run and the pre-flight memory check
    trainer       the training run and its entry point (`scripts/train.py`, `yarnkit train`)
"""

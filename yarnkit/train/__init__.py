"""The training stage of yarnkit, one module per step, imports going one way down this list (README's layout and
tests/test_layout.py hold the same order):

    pose          PoSE position skipping (PoseArgs; pure)
    synthetic     synthetic retrieval rows (SyntheticArgs) from the train-only templates of yarnkit.needles
    data          documents -> BOS/EOS tokens -> seq_len chunks (DataArgs; cached); data mix; resumable sample order
    speed         speed and memory knobs: attention backend, Liger kernels, compiled layers, keep-attention
                  checkpointing, TiledMLP, offload; `auto` choices fall back in one line
    model_setup   the model to train: load or build, YaRN config, sink token, LoRA, checkpointing (ModelArgs, ...)
    seq_parallel  DeepSpeed Ulysses sequence parallelism: checks, sharding, loss
    loss          Liger fused or chunked cross-entropy over the causal LM (training)
    optim         AdamW + warmup/linear schedule (OptimArgs)
    checkpoint    atomic step_NNNNNN checkpoints, keep-last-N, exact resume (CheckpointArgs)
    metrics       metrics.jsonl writer and reader (+ TensorBoard)
    loop          one launch's accelerator and one micro-batch's loss (TrainArgs)
    recipe        Recipe = every section's *Args; defaults < YAML < key=value; strict keys and cross-checks
    estimate      FLOPs/memory/time estimates for --dry-run and the pre-flight memory check
    profiling     torch.profiler breakdown of one step (train.profile_step)
    trainer       the training run
    cli           the `yarnkit train` command (`scripts/train.py`)

What the other stages share with training lives at the package root: the run layout and the checkpoint resolver
(`yarnkit.runs`), documents and data aliases (`yarnkit.corpus`), `YarnArgs` and `apply_yarn` (`yarnkit.patch`),
the chunked NLL (`yarnkit.nll`), the SDPA kernel choice (`yarnkit.sdpa`) and the errors (`yarnkit.errors`).
Benchmarks of training are `yarnkit.bench`.
"""

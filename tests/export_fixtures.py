"""Fixtures for the export tests: tiny YaRN Llama models saved in the run-directory layout the trainer writes.

`tiny_bpe_tokenizer()` trains a 384-token byte-level BPE on the bundled book in-process (no download);
`tiny_yarn_model()` is conftest's tiny Llama with YaRN x4 applied by `apply_rope_scaling` (native 256 -> 1024 tokens)
and Q/K weights x4 so attention depends on position;
`make_run(root, ...)` writes RUN/recipe.yaml, RUN/checkpoints/step_*/model/ (full weights or a LoRA adapter),
and RUN/eval/*.json + a PNG. Imported by tests/test_export*.py; not a test file itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from conftest import tiny_model

VOCAB = 384
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "rope_theta": 10000.0}


def tiny_bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from yarnkit.assets import sample_path
    from yarnkit.corpus import read_text

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([read_text(sample_path("eval"))[:200_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_yarn_model(seed: int = 0, rope: dict | None = None, **overrides):
    """Tiny Llama with `rope` (default: YaRN x4) applied by `yarnkit.patch.apply_rope_scaling`, as in training."""
    from yarnkit.patch import apply_rope_scaling

    rope = dict(rope or YARN)
    params = {k: v for k, v in rope.items()
              if k not in ("rope_type", "factor", "rope_theta", "original_max_position_embeddings")}
    model = tiny_model("llama", seed=seed, vocab_size=VOCAB, **overrides)
    apply_rope_scaling(model, rope["rope_type"], factor=rope["factor"],
                       original_max_position_embeddings=rope.get("original_max_position_embeddings"), **params)
    with torch.no_grad():  # sharper attention than the 0.02-std init, so positions (and so RoPE) matter:
        for name, weight in model.named_parameters():  # dropping YaRN moves logits by ~14% instead of ~1%
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                weight.mul_(4.0)
    return model


def make_run(root: Path, model=None, tokenizer=None, lora: bool = False, base_dir: Path | None = None,
             step: int = 400, with_eval: bool = True, adapter_config_json: bool = True) -> Path:
    """A fake RUN dir as yarnkit's trainer writes it (its recipe schema too); returns RUN. For LoRA,
    `adapter_config_json=False` leaves out config.json as peft's save_pretrained does."""
    run = root / "run"
    model_dir = run / "checkpoints" / f"step_{step:06d}" / "model"
    model_dir.mkdir(parents=True)
    recipe = {"model": {"name_or_path": str(base_dir) if base_dir else "tiny-llama"},
              "yarn": {"rope_type": "yarn", "factor": 4.0}, "data": {"source": "bundled:train", "seq_len": 1024},
              "optim": {"lr": 2e-5}, "train": {"max_steps": step}}
    for folder in (run, model_dir.parent):
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (model_dir.parent / "state").mkdir()
    (model_dir.parent / "state" / "trainer_state.json").write_text(json.dumps({"step": step}))  # written last
    if lora:
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
        peft_model.save_pretrained(model_dir)
        if adapter_config_json:
            model.config.save_pretrained(model_dir)
    else:
        model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    if with_eval:
        (run / "eval").mkdir()
        (run / "eval" / "perplexity.json").write_text(json.dumps(
            {"task": "perplexity", "results": [{"length": 256, "ppl": 41.2}, {"length": 1024, "ppl": 39.8}]}))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.plot([256, 1024], [41.2, 39.8])
        plt.savefig(run / "eval" / "perplexity.png")
        plt.close()
    return run

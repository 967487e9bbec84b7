"""Helpers for the trainer tests: a tiny random Llama + character tokenizer saved to disk, and recipe overrides.

Not a test file; imported by tests/test_trainer.py and tests/test_distributed.py.
"""

from __future__ import annotations

import gzip
import string
from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>"]
CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"


def char_tokenizer():
    """A transformers fast tokenizer with one token per character (vocab 97 < the tiny model's 128)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + list(CHARS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_tiny_model_dir(folder: Path) -> Path:
    """Save conftest's tiny Llama (2 layers, hidden 64, native context 256) with the char tokenizer."""
    from conftest import tiny_model

    model = tiny_model("llama", seed=0, bos_token_id=1, eos_token_id=2)
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def make_text_file(path: Path, chars: int = 20_000) -> Path:
    """The first `chars` characters of the bundled training novel, as a .txt.gz document."""
    from yarnkit.assets import sample_path
    from yarnkit.corpus import read_text

    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(read_text(sample_path("train"))[:chars])
    return path


def tiny_assets(root: Path) -> dict:
    """A tiny model folder, a small gzip'd book and a data cache folder under `root` (a module fixture's folder)."""
    return {"model": make_tiny_model_dir(root / "model"), "data": make_text_file(root / "data.txt.gz"),
            "cache": root / "cache", "root": root}


def tiny_overrides(model_dir: Path, data_path: Path, run_dir: Path, cache_dir: Path, **extra) -> list[str]:
    """Overrides for a tiny CPU run: YaRN x2 (512 positions), 64-token chunks, fp32, no warmup."""
    settings = {
        "run_dir": run_dir, "model.name_or_path": model_dir, "model.gradient_checkpointing": False,
        "yarn.factor": 2.0, "data.source": data_path, "data.seq_len": 64, "data.cache_dir": cache_dir,
        "optim.lr": 1e-3, "optim.warmup_steps": 0, "train.max_steps": 4, "train.micro_batch_size": 2,
        "train.grad_accum": 2, "train.mixed_precision": "fp32", "train.loss_chunk_tokens": 40,
        "checkpoint.every": 2, "checkpoint.keep_last": 3,
    }
    settings.update(extra)
    return [f"{key}={value}" for key, value in settings.items()]

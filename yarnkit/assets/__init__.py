"""Small public-domain texts shipped with yarnkit (see README.md here): `sample_path("eval")` or `("train")`."""

from pathlib import Path

SAMPLES = {
    "eval": "test_54537_musical-instruments.txt.gz",  # PG-19 test split: evaluation only
    "train": "train_1259_twenty-years-after.txt.gz",  # PG-19 novel outside the test split
}


def sample_path(kind: str) -> Path:
    if kind not in SAMPLES:
        raise KeyError(f"unknown sample {kind!r}; choose one of {sorted(SAMPLES)}")
    return Path(__file__).with_name(SAMPLES[kind])

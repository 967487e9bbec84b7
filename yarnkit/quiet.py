"""Silence the known-harmless warnings of yarnkit's libraries where they start, and only those.

- DeepSpeed logs "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it"
  whenever it is imported on a machine without CUDA (accelerate and transformers import it for every model they
  unwrap). `silence_known_warnings` names the CPU accelerator up front (`DS_ACCELERATOR=cpu`, DeepSpeed's own
  switch), so it has nothing to detect. A user's own DS_ACCELERATOR wins.
- accelerate's `save_state` logs "Removed shared tensor {...} while saving" once per checkpoint for a model whose
  output head is tied to its input embedding (SmolLM2): safetensors stores one copy, and loading re-ties them.
  `tied_weights_notice(model)` drops that record only when every removed name is one of the model's tied
  weights; any other shared tensor still warns.

Called by the `yarnkit` command's boundary (yarnkit/cli.py) and the trainer's checkpoint writer.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager

SHARED_TENSOR_LOGGER = "accelerate.utils.other"
SHARED_TENSOR_MESSAGE = re.compile(r"Removed shared tensor \{(.*)\} while saving")
WRAPPER_PREFIXES = re.compile(r"^((module|_orig_mod)\.)+")  # DDP / torch.compile wrappers rename parameters


def silence_known_warnings() -> None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def tied_parameter_names(model) -> set[str]:
    """Names (every alias) of parameters that share storage with another parameter of `model`."""
    by_storage: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_storage.setdefault(param.data_ptr(), []).append(name)
    return {WRAPPER_PREFIXES.sub("", name) for names in by_storage.values() if len(names) > 1 for name in names}


class _DropTiedNotice(logging.Filter):
    def __init__(self, tied: set[str]):
        super().__init__()
        self.tied = tied

    def filter(self, record: logging.LogRecord) -> bool:
        match = SHARED_TENSOR_MESSAGE.search(record.getMessage())
        if match is None:
            return True
        removed = {WRAPPER_PREFIXES.sub("", name.strip().strip("'\"")) for name in match.group(1).split(",")}
        return not removed <= self.tied


@contextmanager
def tied_weights_notice(model):
    """Inside: accelerate's "Removed shared tensor" notice is dropped when it only names `model`'s tied weights."""
    logger = logging.getLogger(SHARED_TENSOR_LOGGER)
    notice = _DropTiedNotice(tied_parameter_names(model))
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)

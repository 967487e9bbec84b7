"""yarnkit.quiet drops exactly the known-harmless library notices: tied-weight saves and DeepSpeed's CPU guess.

    python -m pytest tests/test_quiet.py -q
"""

from __future__ import annotations

import logging
import os

import torch
from conftest import tiny_model

from yarnkit import quiet


def _clean(state_dict):
    from accelerate import PartialState
    from accelerate.utils.other import clean_state_dict_for_safetensors

    PartialState(cpu=True)  # accelerate's logger needs its state
    return clean_state_dict_for_safetensors(state_dict)


def test_tied_weights_notice_is_dropped_and_other_shared_tensors_still_warn(caplog):
    model = tiny_model(tie_word_embeddings=True)
    assert quiet.tied_parameter_names(model) == {"model.embed_tokens.weight", "lm_head.weight"}
    with caplog.at_level(logging.WARNING):
        _clean(dict(model.state_dict()))  # without the filter: accelerate's notice
    assert "Removed shared tensor {'lm_head.weight'}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING), quiet.tied_weights_notice(model):
        _clean(dict(model.state_dict()))
    assert "Removed shared tensor" not in caplog.text
    state = dict(model.state_dict())
    state["copy_of_norm"] = state["model.norm.weight"]  # storage shared at run time: a real warning
    with caplog.at_level(logging.WARNING), quiet.tied_weights_notice(model):
        _clean(state)
    assert "Removed shared tensor" in caplog.text and "'copy_of_norm'" in caplog.text
    assert not logging.getLogger(quiet.SHARED_TENSOR_LOGGER).filters  # the filter lives only inside the block


def test_deepspeed_is_told_the_cpu_accelerator_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    quiet.silence_known_warnings()
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")
    quiet.silence_known_warnings()
    assert os.environ["DS_ACCELERATOR"] == "xpu"

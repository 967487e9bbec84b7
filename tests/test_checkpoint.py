"""The one checkpoint resolver (`yarnkit.train.checkpoint`): what "complete" means, numeric step order, and every
entry point (train's resume, export, eval, chat/serve) choosing the same checkpoint of a run directory.

Run: python -m pytest tests/test_checkpoint.py -q
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from yarnkit.runs import find_checkpoint, is_complete, latest_checkpoint, list_checkpoints, model_location
from yarnkit.errors import CheckpointError


def fake_checkpoint(run: Path, name: str, model: bool = True, trainer_state: bool = True) -> Path:
    """A checkpoint folder as the trainer leaves it (only the files the resolver looks at)."""
    folder = run / "checkpoints" / name
    (folder / "state").mkdir(parents=True)
    if model:
        (folder / "model").mkdir()
        (folder / "model" / "config.json").write_text('{"model_type": "llama"}')
    if trainer_state:
        (folder / "state" / "trainer_state.json").write_text("{}")
    return folder


@pytest.fixture
def run(tmp_path) -> Path:
    """Two complete checkpoints whose names sort the other way round, plus three that are not complete."""
    run = tmp_path / "run"
    fake_checkpoint(run, "step_999999")
    fake_checkpoint(run, "step_1000000")  # newest by step number; alphabetically "step_1..." < "step_9..."
    fake_checkpoint(run, ".tmp-step_2000000")  # a save still being written (every file already there)
    fake_checkpoint(run, "step_3000000", trainer_state=False)
    fake_checkpoint(run, "step_4000000", model=False)
    return run


def test_complete_means_a_step_name_model_and_trainer_state(run):
    folder = run / "checkpoints"
    assert [is_complete(folder / name) for name in ("step_999999", "step_1000000", ".tmp-step_2000000",
                                                    "step_3000000", "step_4000000")] == [True, True, False, False, False]
    assert [step for step, _ in list_checkpoints(run)] == [999999, 1000000]
    assert latest_checkpoint(run) == folder / "step_1000000"


class Opened(Exception):
    """Raised by the stand-in loader once it has seen which folder an entry point opens."""


def test_every_entry_point_picks_the_same_checkpoint(run, monkeypatch):
    from yarnkit.eval.loading import load_for_eval
    from yarnkit.export.source import find_export_source
    from yarnkit.runtime.options import load_chat_model
    from yarnkit.train.trainer import _resume_point

    def loader(location, **options):
        raise Opened(location)

    monkeypatch.setattr("yarnkit.models.load_model", loader)
    newest = run / "checkpoints" / "step_1000000"
    save_file({"weight": torch.zeros(1)}, str(newest / "model" / "model.safetensors"))  # export reads its header
    assert _resume_point(SimpleNamespace(resume="auto"), run) == newest
    assert find_export_source(run).model_dir == newest / "model"
    opened = []
    for open_model in (lambda: load_chat_model(str(run)),
                       lambda: load_for_eval(SimpleNamespace(model=str(run), device="cpu", dtype="float32"))):
        with pytest.raises(Opened) as seen:
            open_model()
        opened.append(str(seen.value))
    assert opened == [str(newest / "model")] * 2 == [model_location(str(run))] * 2


def test_paths_that_are_not_runs(run, tmp_path):
    checkpoint = run / "checkpoints" / "step_999999"
    assert find_checkpoint(checkpoint) == checkpoint  # named explicitly: used as given
    assert model_location(str(checkpoint)) == str(checkpoint / "model")
    for other in ("smollm2-135m", "some-org/some-model", str(tmp_path / "model.gguf"), str(tmp_path)):
        assert find_checkpoint(other) is None and model_location(other) == other


def test_a_run_without_a_complete_checkpoint_names_the_fix(tmp_path):
    from yarnkit.export.source import find_export_source

    fake_checkpoint(tmp_path / "run", "step_000100", trainer_state=False)
    with pytest.raises(CheckpointError, match="without a finished checkpoint: no complete .*train until the first"):
        model_location(str(tmp_path / "run"))
    with pytest.raises(CheckpointError, match="without a finished checkpoint"):
        find_export_source(tmp_path / "run")


def test_lora_adapters_are_refused_by_model_loaders(tmp_path):
    folder = fake_checkpoint(tmp_path / "run", "step_000100")
    (folder / "model" / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="LoRA adapter, not full weights; merge it first: yarnkit export"):
        model_location(str(tmp_path / "run"))


def test_resume_from_an_incomplete_checkpoint_is_refused(run):
    from yarnkit.train.trainer import _resume_point

    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        _resume_point(SimpleNamespace(resume=str(run / "checkpoints" / "step_3000000")), run)
    assert _resume_point(SimpleNamespace(resume=str(run / "checkpoints" / "step_999999")), run).name == "step_999999"

"""`yarnkit.outputs.write_json_atomic`: a report is replaced in one step, never left half-written.

Run: `python -m pytest tests/test_outputs.py -q`
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from yarnkit.outputs import write_json_atomic


def test_write_json_atomic_replaces_the_file_and_leaves_no_partial(tmp_path):
    path = tmp_path / "report.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2, "path": Path("/x")}, indent=2)  # a value JSON cannot hold: its str
    assert json.loads(path.read_text()) == {"a": 2, "path": "/x"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_failed_write_keeps_the_previous_report(tmp_path):
    path = tmp_path / "report.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(ValueError):
        write_json_atomic(path, {"x": _Unwritable()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


class _Unwritable:
    """An object whose `str` raises: the encoder fails before anything is renamed."""

    def __str__(self):
        raise ValueError("cannot be written")

"""Where commands write: every output path is checked before the long work starts, and nothing is created by the check.
`write_json_atomic(path, data)` writes a report so that a reader (or a kill mid-write) never sees half a file.

`check_output_dir(path, flag)` and `check_output_file(path, flag, suffixes)` fail with one line (a `BadValue`
naming the flag, the path and the fix) when the command could not write there at the end: a file where a folder is
needed or the reverse, a parent path that runs through a file, a folder that takes no new files (read-only,
another user's, a read-only or pseudo file system), or a file suffix the writer cannot produce (a plot as .json).
Writability is probed, not guessed from mode bits (root ignores them, a read-only mount does not): a temporary
folder is created in the nearest existing folder and removed again, so the inputs stay exactly as they were.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from yarnkit.errors import BadValue

PLOT_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg")  # formats every matplotlib backend writes


def _named(flag: str, path: Path) -> str:
    """`--out /x` for a flag, `run_dir=/x` for a recipe key."""
    return f"{flag}{path}" if flag.endswith("=") else f"{flag} {path}"


def nearest_existing(path: Path) -> Path:
    """`path` itself or its closest ancestor that exists (what a `mkdir -p` would start from)."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe(folder: Path, flag: str, shown: Path) -> None:
    try:
        probe = tempfile.mkdtemp(prefix=".yarnkit-write-probe-", dir=folder)
    except OSError as error:
        raise BadValue(f"{_named(flag, shown)}: cannot write in {folder} ({error.strerror})",
                       f"choose a folder you can write to, e.g. {_named(flag, Path.home() / shown.name)}") from None
    shutil.rmtree(probe, ignore_errors=True)


def check_output_dir(path: str | Path, flag: str) -> None:
    """The folder `path` exists or can be created, and new files can be written in it."""
    shown = Path(path).expanduser()
    if shown.exists() and not shown.is_dir():
        raise BadValue(f"{_named(flag, shown)} is a file, not a folder", f"pass a folder path to {flag}")
    base = nearest_existing(shown)
    if not base.is_dir():
        raise BadValue(f"{_named(flag, shown)}: {base} is a file, so no folder can be made below it",
                       f"pass a path that runs through folders only to {flag}")
    _probe(base, flag, shown)


def check_output_file(path: str | Path, flag: str, suffixes: tuple[str, ...] = (),
                      create_parent: bool = True) -> None:
    """The file `path` can be written: not a folder, a wanted suffix, a parent folder that exists (or, with
    `create_parent`, can be made) and takes new files."""
    shown = Path(path).expanduser()
    if shown.is_dir():
        raise BadValue(f"{_named(flag, shown)} is a folder, not a file", f"pass a file path, e.g. "
                       f"{_named(flag, shown / ('out' + (suffixes[0] if suffixes else '')))}")
    if suffixes and shown.suffix.lower() not in suffixes:
        raise BadValue(f"{_named(flag, shown)}: cannot write a {shown.suffix or 'suffix-less'} file here",
                       f"use one of {', '.join(suffixes)}, e.g. {_named(flag, shown.with_suffix(suffixes[0]))}")
    parent = shown.parent
    if not create_parent and not parent.is_dir():
        raise BadValue(f"{_named(flag, shown)}: the folder {parent} does not exist",
                       "create it first, or write elsewhere")
    base = nearest_existing(parent)
    if not base.is_dir():
        raise BadValue(f"{_named(flag, shown)}: {base} is a file, so nothing can be written below it",
                       f"pass a path that runs through folders only to {flag}")
    _probe(base, flag, shown)


def write_json_atomic(path: str | Path, data, indent: int = 1) -> None:
    """`data` as JSON at `path`, written beside it under a hidden name and renamed over it in one step (values JSON
    cannot hold are written as their `str`)."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data, indent=indent, default=str) + "\n")
    os.replace(partial, path)

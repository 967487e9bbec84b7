"""yarnkit's user errors: bad input the user can fix, with a message that says what is wrong and how to fix it.

`UserError(what, fix)` reads "<what> — <fix>". The `yarnkit` command's error boundary (yarnkit/cli.py) prints
it as one line, `yarnkit: error: <what> — <fix>`, and exits 2; any other exception is a bug and keeps its
traceback. Subclasses also derive from the built-in a caller would expect (`BadValue` is a ValueError,
`NotFound` a FileNotFoundError, `AlreadyExists` a FileExistsError), so code that catches those keeps working. This module imports nothing: every
other yarnkit module may raise these. The training and export sides add their own (`yarnkit.train.errors`,
`yarnkit.export.source.ExportError`).
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix. `UserError(what, fix)` or one message that already names the fix."""

    def __init__(self, what: str, fix: str | None = None):
        super().__init__(f"{what} — {fix}" if fix else what)


class BadValue(UserError, ValueError):
    """A flag or setting with a value that cannot work (a dtype, a device, a length, a depth)."""


class NotFound(UserError, FileNotFoundError):
    """A path the user named that does not exist or is not what the command needs."""


class AlreadyExists(UserError, FileExistsError):
    """Something the command would write over (a run's checkpoints) that it did not create."""


class BadModel(UserError, ValueError):
    """A path that exists but is not a loadable model: no config.json, a text file named .gguf, torn weights."""

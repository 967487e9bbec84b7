"""yarnkit's user errors: bad input the user can fix, with a message that says what is wrong and how to fix it.

`UserError(what, fix)` reads "<what> — <fix>". The `yarnkit` command's error boundary (yarnkit/cli.py) prints
it as one line, `yarnkit: error: <what> — <fix>`, and exits 2; any other exception is a bug and keeps its
traceback. Subclasses also derive from the built-in a caller would expect (`BadValue` is a ValueError,
`NotFound` a FileNotFoundError, `AlreadyExists` a FileExistsError), so code that catches those keeps working. This module imports nothing: every
other yarnkit module may raise these. Every error class of yarnkit is here, grouped by the stage that raises it
(the HTTP server's own responses, `runtime.api.ApiError` and `runtime.scheduler.SessionBusy`, are protocol
objects of that server and live there). `one_line(error)` is how any error is named in one line of a log or a status.
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


class UsageError(BadValue):
    """A command line argparse rejects (unknown flag, bad choice, missing argument)."""


class HubUnavailable(UserError, OSError):
    """A hub id that is not in the local cache while the hub cannot be reached."""


class RopeScalingError(BadValue):
    """A scaling request that cannot be applied as asked; the message names the value and the fix."""


class AlreadyScaled(RopeScalingError):
    """The model already has a scaling (and `replace` was not asked): scaling it again would compound them."""

    def __init__(self, model_type: str, rope_type: str, factor):
        self.scaling = f"rope_type {rope_type!r} (factor {factor})"
        super().__init__(f"this {model_type} model already uses {self.scaling}: patching twice would compound the "
                         "scalings. Undo the earlier patch (handle.undo()), load the unscaled base model, or pass "
                         "replace=True to re-scale relative to its original context.")


class SinkTokenError(ValueError):
    """A sink-token setting that cannot work; the message names the fix."""


class TemplateError(BadValue):
    """A retrieval template that cannot be used; the message names it and the fix."""


class TemplateCollision(TemplateError):
    """A training template that an evaluation template would recognise; the message names both and the fix."""


# -- training ----------------------------------------------------------------------------------------------------------
class RecipeError(UserError, ValueError):
    """A recipe that cannot be loaded or cannot work; the message names the key and the fix."""


class DataError(UserError, ValueError):
    """Data that cannot make one training sequence; the message names the source and the fix."""


class MemoryBudgetError(UserError, MemoryError):
    """The pre-flight estimate exceeds the device's memory; the message names the knobs that shrink it."""


class CheckpointError(UserError, FileNotFoundError):
    """A run without a complete checkpoint, or a checkpoint a loader cannot open; the message names the path and
    the fix."""


# -- export, runtime, evaluation ---------------------------------------------------------------------------------------
class ExportError(UserError, RuntimeError):
    """An export input or output problem, with a message that names the path and the fix."""


class PromptTooLong(ValueError):
    """The prompt (as tokens) is longer than the configured limit; the message names the field."""


class DatasetUnavailable(UserError, RuntimeError):
    """A `hf:` dataset that is not in the local cache of this offline machine."""


class RetrievalError(BadValue):
    """Input a retrieval evaluation cannot use; the message names the value and the fix."""


def one_line(error: BaseException) -> str:
    """`Type: the first line of its message`, for a log line or a status field (CUDA's errors, among others, append
    lines of debugging advice)."""
    return f"{type(error).__name__}: {next(iter(str(error).strip().splitlines()), '')}"

"""The training side's user errors, in a leaf module that every other `yarnkit.train` module may import.

A `RecipeError` is a recipe that cannot be loaded or cannot work; a `DataError` is data that cannot make one
training sequence; a `MemoryBudgetError` a run that the memory estimate says cannot fit; a `CheckpointError` a
run or checkpoint that cannot be used. Their messages name the key, source or path and the fix; they are
`yarnkit.errors.UserError`s, so the `yarnkit` command prints them as one line.
"""

from yarnkit.errors import UserError


class RecipeError(UserError, ValueError):
    """A recipe that cannot be loaded or cannot work; the message names the key and the fix."""


class DataError(UserError, ValueError):
    """Data that cannot make one training sequence; the message names the source and the fix."""


class MemoryBudgetError(UserError, MemoryError):
    """The pre-flight estimate exceeds the device's memory; the message names the knobs that shrink it."""


class CheckpointError(UserError, FileNotFoundError):
    """A run without a complete checkpoint, or a checkpoint a loader cannot open; the message names the path and
    the fix."""

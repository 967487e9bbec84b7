"""The training side's user errors, in a leaf module that every other `yarnkit.train` module may import.

A `RecipeError` is a recipe that cannot be loaded or cannot work; a `DataError` is data that cannot make one
training sequence. Both messages name the key or source and the fix; the entry points print them as one line.
"""


class RecipeError(ValueError):
    """A recipe that cannot be loaded or cannot work; the message names the key and the fix."""


class DataError(ValueError):
    """Data that cannot make one training sequence; the message names the source and the fix."""

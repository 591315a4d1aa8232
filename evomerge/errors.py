"""Exceptions raised for bad input; each message says what is wrong and what would be accepted."""


class EvomergeError(ValueError):
    """Base class for user-facing errors (bad paths, configs, checkpoints)."""


class CheckpointError(EvomergeError):
    """A checkpoint is missing, unreadable, or incompatible with the others."""


class RecipeError(EvomergeError):
    """A recipe or search config is malformed or names something unknown."""


class NonFiniteError(EvomergeError):
    """An input tensor holds NaN or infinity."""


class TaskError(EvomergeError):
    """A fitness task definition or its data is malformed, or names a field the data lacks."""

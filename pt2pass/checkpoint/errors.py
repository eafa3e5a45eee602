"""The one error type of checkpoint loading and saving."""


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, too new, or does not fit the model it is loaded into.

    The message names the file or tensor and what is wrong with it."""

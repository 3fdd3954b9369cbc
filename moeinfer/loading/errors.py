"""Errors raised while reading or writing checkpoints; each names the file and tensor at fault."""


class CheckpointError(ValueError):
    """A checkpoint directory, file or tensor is missing, truncated, corrupt or of the wrong shape."""

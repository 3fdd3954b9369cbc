"""Errors of the stored formats (compressed layouts), shared by the loader and `moeinfer.compress`."""

from __future__ import annotations


class CompressionError(ValueError):
    """A recipe, its parameters or the model cannot be compressed as asked."""

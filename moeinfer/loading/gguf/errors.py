"""Errors of GGUF export and import; each names the file, key, tensor or type at fault."""

from __future__ import annotations

from moeinfer.loading.errors import CheckpointError


class GGUFError(CheckpointError):
    """A GGUF file cannot be written or read: an unsupported architecture or tensor type, a missing or
    bad metadata key, a missing or mis-shaped tensor, or a file that is not GGUF at all."""

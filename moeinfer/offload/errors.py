"""The error of offloading, shared by its settings, store, transfers and cache."""

from __future__ import annotations


class OffloadError(RuntimeError, ValueError):
    """Offloading failed (a transfer, the store, a bad setting); the message names what is at fault.
    A ValueError too, so the command line reports it as bad input."""

"""What kind of checkpoint a path names: an HF-format directory or a GGUF file (llama.cpp's format)."""

from __future__ import annotations

import os
from pathlib import Path

GGUF_MAGIC = b"GGUF"


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """True for a file named *.gguf (its reader then names what is wrong with it) or one that starts with
    GGUF's magic bytes, whatever its name."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() == ".gguf":
        return True
    with open(p, "rb") as f:
        return f.read(4) == GGUF_MAGIC

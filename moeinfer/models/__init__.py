"""Models shipped inside the package (package data), reachable by name from `moeinfer.load`."""

from __future__ import annotations

import os
from pathlib import Path

SHIPPED = {"tiny": "moeinfer-tiny"}


def shipped_model_dir(name: str) -> Path | None:
    folder = SHIPPED.get(name)
    if folder is None:
        return None
    path = Path(__file__).parent / folder
    return path if (path / "config.json").is_file() else None


def resolve_model_path(path: str | os.PathLike[str]) -> Path:
    """A directory, or the name of a model shipped with moeinfer."""
    p = Path(path)
    if p.exists():
        return p
    shipped = shipped_model_dir(str(path))
    return shipped if shipped is not None else p

"""Models shipped inside the package (package data), reachable by name from `moeinfer.load`."""

from __future__ import annotations

from pathlib import Path

SHIPPED = {"tiny": "moeinfer-tiny"}


def shipped_model_dir(name: str) -> Path | None:
    folder = SHIPPED.get(name)
    if folder is None:
        return None
    path = Path(__file__).parent / folder
    return path if (path / "config.json").is_file() else None

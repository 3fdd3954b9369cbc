"""results.json: the versioned record of a benchmark run, validated on write and on read.

The file holds every raw measurement (token timestamps of each request, each forward's time, shape
and expert use, energy readings), the hardware and software, the measured and datasheet peaks, the
git commit, the date, the full sweep configuration, and the metrics derived from the raw data. Its
JSON Schema is results.schema.json beside this module (schema_version 1); docs/benchmark.md
describes the fields.

Writing is atomic (temp file in the same folder, fsync, rename), so an interrupted sweep leaves
the last complete file behind, and `--resume` can keep its finished points.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

from moeinfer._optional import require
from moeinfer.fsutil import atomic_write_text

SCHEMA_FILE = Path(__file__).parent / "results.schema.json"
SCHEMA_NAME = "moeinfer-bench-results"
SCHEMA_VERSION = 1


class ResultsError(ValueError):
    """A results file is malformed; the message names the file and the field at fault."""


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text())


def clean(x: Any) -> Any:
    """JSON-ready copy: NaN and infinities become null, tuples lists, numpy scalars Python numbers."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def validate(data: Any, where: str = "results") -> None:
    """Raise ResultsError naming `where` and the JSON path of the first problem found."""
    jsonschema = require("jsonschema", "validating benchmark results")
    if isinstance(data, dict) and data.get("schema") == SCHEMA_NAME and data.get("schema_version") != SCHEMA_VERSION:
        raise ResultsError(f"{where}: schema_version {data.get('schema_version')!r} is not supported "
                           f"(this moeinfer reads version {SCHEMA_VERSION})")
    validator = jsonschema.Draft202012Validator(schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
        raise ResultsError(f"{where}: {path or '(top level)'}: {error.message}")


def write_results(data: dict[str, Any], path: str | Path) -> Path:
    """Validate, then write atomically: temp file beside `path`, fsync, rename over it."""
    path = Path(path)
    data = clean(data)
    validate(data, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, dumps(data))
    return path


def dumps(data: dict[str, Any]) -> str:
    """Indented at the top level, one compact line per point (raw arrays stay small and diffable)."""
    items = []
    for k, v in data.items():
        if k == "points":
            body = ",\n".join("  " + json.dumps(p, separators=(",", ":")) for p in v)
            items.append(f' "points": [\n{body}\n ]' if v else ' "points": []')
        else:
            items.append(f" {json.dumps(k)}: {json.dumps(v)}")
    return "{\n" + ",\n".join(items) + "\n}\n"


def write_text_atomic(path: Path, text: str | bytes) -> None:
    atomic_write_text(path, text)


def read_results(path: str | Path) -> dict[str, Any]:
    """Read and validate a results file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, json.JSONDecodeError) as e:
        raise ResultsError(f"{path}: not a readable JSON file: {e}") from e
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_NAME:
        raise ResultsError(f"{path}: not a moeinfer bench results file (no \"schema\": \"{SCHEMA_NAME}\")")
    validate(data, str(path))
    return data


def finished_points(path: str | Path, config_digest: str) -> dict[str, dict[str, Any]]:
    """For --resume: the successful points of an earlier run with the same settings, by id."""
    path = Path(path)
    if not path.exists():
        return {}
    data = read_results(path)
    if data.get("config_digest") != config_digest:
        raise ResultsError(f"{path}: was written with different sweep settings (scale, seed, SLO, quality, "
                           f"workload overrides...); use another --out folder or drop --resume")
    return {p["id"]: p for p in data["points"] if p["status"] == "ok"}

"""Part b: `pytest -m gpu`, fail-fast off, every test's outcome recorded.

1. run pytest in a child process with the `gpu` marker on every test file that holds a gpu test
   (on the CPU of the dry run they skip: no CUDA), fail-fast off, collection errors not stopping it;
2. the plugin gpu_suite_parts.pytest_log appends one JSON line per test as it finishes;
3. the part is `ok` when nothing failed or errored and, on a GPU, nothing was skipped either
   (a skipped gpu test on a GPU means a path was not proved).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from gpu_suite_parts.common import Context, Result, part


def gpu_test_files(repo: Path) -> list[str]:
    """The test files that hold `gpu`-marked tests (only they are collected: the others' optional
    dependencies, e.g. the server's, need not be installed on a GPU machine), in every folder of tests/."""
    files = sorted(str(p.relative_to(repo)) for p in (repo / "tests").rglob("test_*.py")
                   if "pytest.mark.gpu" in p.read_text())
    if not files:
        raise FileNotFoundError(f"no test file under {repo / 'tests'} holds a pytest.mark.gpu test")
    return files


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@part("tests", letter="b", title="pytest -m gpu", share_s=130, markdown=lambda r: markdown(r))
def run(ctx: Context) -> Result:
    log = ctx.scratch / "pytest-gpu.jsonl"
    target = gpu_test_files(ctx.repo)
    cmd = [sys.executable, "-m", "pytest", *target, "-m", "gpu", "-p", "gpu_suite_parts.pytest_log", "-q",
           "--continue-on-collection-errors", "-p", "no:cacheprovider"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["--timeout", "240"]  # one hung test must not take the whole part
    here = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, GPU_SUITE_PYTEST_LOG=str(log),
               PYTHONPATH=os.pathsep.join(p for p in (str(ctx.repo), here, os.environ.get("PYTHONPATH")) if p))
    timeout = max(ctx.time_left() - 3, 1)
    result: Result = dict(command=" ".join(cmd[1:]), timed_out=False, dry_run=ctx.dry_run)
    try:
        proc = subprocess.run(cmd, cwd=ctx.repo, env=env, capture_output=True, text=True, timeout=timeout)
        result.update(exit_code=proc.returncode, output_tail=(proc.stdout + proc.stderr)[-4000:])
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"") + (e.stderr or b"")
        result.update(timed_out=True, exit_code=None,
                      output_tail=(out.decode(errors="replace") if isinstance(out, bytes) else out)[-4000:])
    tests = read_log(log)
    counts = Counter(t["outcome"] for t in tests)
    # 3. without CUDA (the dry run) every gpu test must skip, saying it needs CUDA; on a GPU none may
    odd = [t["test"] for t in tests if t["outcome"] == "skipped" and (not ctx.dry_run or "CUDA" not in t["message"])]
    result.update(tests=tests, counts=dict(counts), unexpected_skips=odd)
    bad = counts["failed"] + counts["error"] + len(odd)
    if result["timed_out"]:
        result["status"] = "timeout"
    elif bad or not tests or result["exit_code"] not in (0, 5):
        result["status"] = "failed"
    return result


def markdown(r: Result) -> str:
    c = r.get("counts", {})
    lines = [f"`{r.get('command')}`: {c.get('passed', 0)} passed, {c.get('failed', 0)} failed, "
             f"{c.get('error', 0)} errors, {c.get('skipped', 0)} skipped"
             + (" (stopped at the deadline)" if r.get("timed_out") else "") + "."]
    # skips are listed where they are failures (on a GPU); the dry run's are all "needs a CUDA GPU"
    shown = ("failed", "error") if r.get("dry_run") else ("failed", "error", "skipped")
    bad = [t for t in r.get("tests", []) if t["outcome"] in shown]
    if bad:
        lines += ["", "| test | outcome | message (end) |", "|---|---|---|"]
        for t in bad[:60]:
            msg = t["message"].strip().splitlines()[-1][:160] if t["message"].strip() else ""
            lines.append(f"| `{t['test']}` | {t['outcome']} | {msg.replace('|', '/')} |")
    return "\n".join(lines)

"""A pytest plugin (`-p gpu_suite_parts.pytest_log`): one JSON line per test outcome and per failed
collection, appended to the file named by $GPU_SUITE_PYTEST_LOG as each finishes, so a run stopped
at its deadline still leaves every finished test's record."""

from __future__ import annotations

import json
import os
from typing import Any


def _write(record: dict[str, Any]) -> None:
    path = os.environ.get("GPU_SUITE_PYTEST_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def pytest_runtest_logreport(report: Any) -> None:
    # a test's outcome is its call phase's, or an earlier phase's failure or skip (setup), or a
    # teardown error after it passed
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed") or (
            report.when == "teardown" and report.outcome == "failed"):
        outcome = report.outcome if report.when == "call" else (
            "skipped" if report.outcome == "skipped" else "error")
        message = ""
        if report.outcome != "passed":
            message = str(report.longrepr)[-2000:] if report.longrepr is not None else ""
        _write(dict(test=report.nodeid, when=report.when, outcome=outcome,
                    seconds=round(report.duration, 3), message=message))


def pytest_collectreport(report: Any) -> None:
    if report.outcome == "failed":
        _write(dict(test=report.nodeid, when="collect", outcome="error", seconds=0.0,
                    message=str(report.longrepr)[-2000:]))

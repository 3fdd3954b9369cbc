"""`moeinfer bench compare A.json B.json`: what changed between two benchmark runs, as ratios B/A.

1. Read and validate both files.
2. Say how the runs differ in machine, software, commit and sweep settings (numbers measured on
   different machines or settings are not comparable; the output says so rather than refusing).
3. Match the points by id; for each headline metric print A, B and B/A, marking changes beyond
   `threshold` as better or worse (lower is better for times, memory, energy and bits per byte).
4. List the points found in one file only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeinfer.bench.results import read_results

# (label, path into a point's metrics, True when higher is better)
METRICS: list[tuple[str, tuple[str, ...], bool]] = [
    ("TTFT p50 (s)", ("latency", "ttft_s", "p50"), False),
    ("TTFT p99 (s)", ("latency", "ttft_s", "p99"), False),
    ("TPOT p50 (s)", ("latency", "tpot_s", "p50"), False),
    ("TPOT p99 (s)", ("latency", "tpot_s", "p99"), False),
    ("latency p50 (s)", ("latency", "latency_s", "p50"), False),
    ("throughput (tok/s)", ("latency", "throughput_tok_s"), True),
    ("goodput (req/s)", ("latency", "goodput_req_s"), True),
    ("weight bytes", ("memory", "weight_bytes"), False),
    ("peak RSS bytes", ("memory", "peak_rss_bytes"), False),
    ("peak GPU bytes", ("memory", "gpu_peak_bytes"), False),
    ("distinct experts/layer/step", ("moe", "distinct_mean_decode"), False),
    ("S-MBU decode (measured)", ("utilization", "measured", "decode", "s_mbu"), True),
    ("S-MFU prefill (measured)", ("utilization", "measured", "prefill", "s_mfu"), True),
    ("J/output token", ("energy", "j_per_output_token"), False),
]


def _get(d: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def _quality_metrics(a: dict[str, Any]) -> list[tuple[str, tuple[str, ...], bool]]:
    return [(f"bits/byte {d}", ("quality", d, "bits_per_byte"), False) for d in sorted(a.get("quality") or {})]


def compare(a: dict[str, Any], b: dict[str, Any], *, names: tuple[str, str] = ("A", "B"),
            threshold: float = 0.05) -> str:
    """The comparison as text (steps 2-4)."""
    lines = [f"A: {names[0]} ({a['created']}, commit {a['git_commit']})",
             f"B: {names[1]} ({b['created']}, commit {b['git_commit']})"]
    # 2. Context.
    for what, ka, kb in [("CPU", a["hardware"]["cpu"], b["hardware"]["cpu"]),
                         ("device", a["hardware"]["device"], b["hardware"]["device"]),
                         ("GPU", _get(a, ("hardware", "gpu", "name")), _get(b, ("hardware", "gpu", "name"))),
                         ("torch", a["software"]["torch"], b["software"]["torch"]),
                         ("moeinfer", a["software"]["moeinfer"], b["software"]["moeinfer"]),
                         ("sweep settings", a.get("config_digest"), b.get("config_digest"))]:
        if ka != kb:
            lines.append(f"note: {what} differs: {ka} vs {kb}")
    pa, pb = _get(a, ("peaks", "measured", "bandwidth_bytes_s")), _get(b, ("peaks", "measured", "bandwidth_bytes_s"))
    if pa and pb:
        lines.append(f"measured copy bandwidth: {pa / 1e9:.1f} vs {pb / 1e9:.1f} GB/s (x{pb / pa:.2f})")
    # 3. Matched points.
    A = {p["id"]: p for p in a["points"] if p["status"] == "ok"}
    B = {p["id"]: p for p in b["points"] if p["status"] == "ok"}
    both = [i for i in A if i in B]
    for pid in both:
        ma, mb = A[pid]["metrics"], B[pid]["metrics"]
        rows = []
        for label, path, higher in METRICS + _quality_metrics(ma):
            va, vb = _get(ma, path), _get(mb, path)
            if va is None and vb is None:
                continue
            if va is None or vb is None or va == 0:
                rows.append(f"  {label:<30} {_n(va):>12} {_n(vb):>12}        -")
                continue
            r = vb / va
            tag = ""
            if abs(r - 1) > threshold:
                tag = "better" if (r > 1) == higher else "worse"
            rows.append(f"  {label:<30} {_n(va):>12} {_n(vb):>12} {r:>8.3f}x {tag}")
        lines += ["", f"{pid}", f"  {'metric':<30} {'A':>12} {'B':>12} {'B/A':>9}", *rows]
    # 4. Unmatched points.
    for pid in A:
        if pid not in B:
            lines.append(f"\nonly in A: {pid}")
    for pid in B:
        if pid not in A:
            lines.append(f"\nonly in B: {pid}")
    if not both:
        lines.append("\nno point ran successfully in both files: nothing to compare")
    return "\n".join(lines)


def _n(x: Any) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def compare_files(path_a: str | Path, path_b: str | Path, *, threshold: float = 0.05) -> str:
    a, b = read_results(path_a), read_results(path_b)  # 1.
    return compare(a, b, names=(str(path_a), str(path_b)), threshold=threshold)

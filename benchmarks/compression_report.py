"""docs/compression.md's tables, claim checks and Pareto plot, from docs/compression.json.

    .venv/bin/python benchmarks/compression_report.py     # after benchmarks/bench_compression.py
The hand-written discussion lives in benchmarks/compression_notes.md and is included verbatim.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _mean_bpb(r: dict[str, Any], datasets: list[str]) -> float:
    return sum(r[f"bpb_{d}"] for d in datasets) / len(datasets)


def _loss(r: dict[str, Any], base: dict[str, Any], d: str) -> float:
    return 100 * (r[f"bpb_{d}"] / base[f"bpb_{d}"] - 1)


def table(rows: list[dict[str, Any]], base: dict[str, Any], datasets: list[str]) -> str:
    head = ("| method | strength | " + " | ".join(f"bpb {d} (Δ%)" for d in datasets)
            + " | weight MB | expert bits/param | experts/token | decode tok/s (x base) | HF-loadable |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        bpb = " | ".join(f"{r[f'bpb_{d}']:.4f} ({_loss(r, base, d):+.2f})" for d in datasets)
        hf = {True: "yes", False: "no (moeinfer format)", None: "-"}[r.get("hf_loadable")]
        lines.append(f"| {r['family']} | {r['strength']} | {bpb} | {r['weight_bytes'] / 1e6:.2f} | "
                     f"{r['expert_bits_per_param']:.2f} | {r['experts_per_token']:.2f} | "
                     f"{r['decode_tok_s']:.1f} ({r['decode_tok_s'] / base['decode_tok_s']:.2f}x) | {hf} |")
    return "\n".join(lines)


def checks(by: dict[str, dict[str, Any]], base: dict[str, Any], datasets: list[str]) -> list[str]:
    """The issue's targets and the papers' ordering claims, decided from the numbers."""
    out = []

    def worst(name: str) -> float:
        return max(_loss(by[name], base, d) for d in datasets)

    def verdict(ok: bool) -> str:
        return "**holds**" if ok else "**does not hold**"

    for name, limit in (("int8", 0.5), ("int4-g128", 3.0)):
        if name in by:
            out.append(f"- {name}: worst bpb loss {worst(name):+.2f}% (target < {limit}%): {verdict(worst(name) < limit)}")
    for frac in ("25", "50"):
        f, others = f"freq-{frac}", [n for n in (f"reap-{frac}", f"naee-{frac}") if n in by]
        if f in by:
            for o in others:
                better = _mean_bpb(by[o], datasets) < _mean_bpb(by[f], datasets)
                out.append(f"- {o} vs {f} (mean bpb {_mean_bpb(by[o], datasets):.4f} vs {_mean_bpb(by[f], datasets):.4f}): "
                           f"reconstruction/importance pruning beats frequency pruning: {verdict(better)}")
    for mixed, uniform in (("mixed-2.5", "int2-g64"), ("mixed-2.5", "int3-g64"), ("mixed-3.0", "int3-g64")):
        if mixed in by and uniform in by:
            m, u = by[mixed], by[uniform]
            better = _mean_bpb(m, datasets) < _mean_bpb(u, datasets)
            size = ("same bytes" if abs(m["weight_bytes"] - u["weight_bytes"]) < 0.01 * u["weight_bytes"]
                    else "mixed smaller" if m["weight_bytes"] < u["weight_bytes"] else "mixed larger")
            out.append(f"- {mixed} ({m['weight_bytes'] / 1e6:.2f} MB, mean bpb {_mean_bpb(m, datasets):.4f}) vs "
                       f"{uniform} ({u['weight_bytes'] / 1e6:.2f} MB, {_mean_bpb(u, datasets):.4f}; {size}): "
                       f"mixed precision better: {verdict(better)}")
    gating = [r for r in by.values() if r["family"] == "dynamic gating"]
    good = [r for r in gating if r["experts_per_token"] <= 0.8 * base["experts_per_token"] and worst(r["name"]) < 1.0]
    if gating:
        out.append(f"- dynamic gating removing >= 20% of expert computations for < 1% bpb loss: {verdict(bool(good))}"
                   + (f" ({', '.join(r['name'] for r in good)})" if good else ""))
    return out


def pareto_plot(rows: list[dict[str, Any]], datasets: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 6))
    families = sorted({r["family"] for r in rows})
    cmap = plt.get_cmap("tab20")
    markers = "osD^v<>Ph*X"
    ymax = 2.6  # sparse-to-dense sits far above: annotated at the top edge instead
    front, best = [], float("inf")
    for r in sorted(rows, key=lambda r: r["weight_bytes"]):
        if _mean_bpb(r, datasets) < best:
            best = _mean_bpb(r, datasets)
            front.append(r)
    for i, fam in enumerate(families):
        pts = [r for r in rows if r["family"] == fam]
        ax.scatter([r["weight_bytes"] / 1e6 for r in pts], [min(_mean_bpb(r, datasets), ymax) for r in pts],
                   label=fam, color=cmap(i % 20), marker=markers[i % len(markers)], s=40)
    for r in rows:
        y = _mean_bpb(r, datasets)
        if r in front or y > ymax:
            text = f"{r['name']}" + (f" ({y:.2f}, off scale)" if y > ymax else "")
            ax.annotate(text, (r["weight_bytes"] / 1e6, min(y, ymax)), fontsize=7, xytext=(4, -9),
                        textcoords="offset points")
    ax.step([r["weight_bytes"] / 1e6 for r in front], [min(_mean_bpb(r, datasets), ymax) for r in front],
            where="post", color="grey", lw=1, ls="--", label="Pareto front")
    ax.set_ylim(top=ymax + 0.03)
    ax.set_xlabel("weight bytes as stored (MB; floating tensors at bf16)")
    ax.set_ylabel(f"mean bits per byte ({' + '.join(datasets)}), lower is better")
    ax.set_title("moeinfer-tiny: quality vs size of every compression method")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=str(ROOT / "docs/compression.json"))
    ap.add_argument("--out-dir", default=str(ROOT / "docs"))
    args = ap.parse_args()
    data = json.loads(Path(args.json).read_text())
    docs = Path(args.out_dir)
    rows = data["rows"]
    datasets = [k.removeprefix("bpb_") for k in rows[0] if k.startswith("bpb_")]
    base = next(r for r in rows if r["name"] == "baseline")
    by = {r["name"]: r for r in rows}
    pareto_plot(rows, datasets, docs / "compression-pareto.png")
    notes = ROOT / "benchmarks/compression_notes.md"
    sw = data["software"]
    text = f"""# Compression: every method on the reference model

Generated by `benchmarks/bench_compression.py` then `benchmarks/compression_report.py` from
`docs/compression.json` ({data['date']}, commit {data.get('commit') or '?'}).
Model: moeinfer-tiny ({', '.join(f'{k} {v}' for k, v in data['model_shape'].items())}), evaluated in fp32.
Machine: {data['device']}, {data['threads']} threads, load average at the end {' '.join(data['load_average_at_end'])};
torch {sw.get('torch')}, Python {sw.get('python')}. The table is CPU-only; the one GPU measurement of quantized experts is the section "int4 experts on a GPU" at the end.

Quality is bits per byte on the first {data['max_bytes']:,} bytes of each shipped held-out text; calibration
({data['calibration']['tokens']} tokens, source `{data['calibration']['source']}`) comes from the *end* of the same
texts, so the two never overlap. Weight bytes count floating tensors at bf16 (the shipped checkpoint's dtype)
and packed integers as stored. Decode is batch-1 greedy, {data.get('decode_tokens', 64)} new tokens, measured in the same run as the
baseline (decode timings on a shared 2-core machine are noisy: read ratios, not absolutes).

{table(rows, base, datasets)}

![quality vs size](compression-pareto.png)

## The issue's targets and the papers' claims, checked on these numbers

{chr(10).join(checks(by, base, datasets))}

{notes.read_text() if notes.is_file() else ''}
"""
    out = docs / "compression.md"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(f"wrote {out} and {docs / 'compression-pareto.png'}")


if __name__ == "__main__":
    main()

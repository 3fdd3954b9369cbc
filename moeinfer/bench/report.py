"""report.md, report.html and PNG plots from a results.json (pure function of the results).

1. Header: date, commit, hardware, software, measured and datasheet peaks, energy setup, SLO.
2. Tables, one row per point: latency; memory; MoE load and utilisation; quality and energy.
3. Plots (matplotlib, Agg backend): throughput vs latency, quality vs memory, energy per output
   token per configuration (replaced by a note when energy was not measurable).
4. report.html: the same tables, with the plots embedded as base64 PNG (self-contained).
Every file is written atomically.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from moeinfer.bench.results import write_text_atomic

PLOTS = ("throughput_latency.png", "quality_memory.png", "energy_per_token.png")


def _f(x: Any, scale: float = 1.0, fmt: str = ".3g") -> str:
    if x is None:
        return "-"
    v = x * scale
    return f"{v:.0f}" if abs(v) >= 1000 else format(v, fmt)  # no exponents in tables


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _mib(x: Any) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def _label(p: dict[str, Any]) -> str:
    c = p["config"]
    parts = [c["workload"], c["routing"]]
    parts += [f"{k}={c[k]}" for k in ("kernel", "compression", "offload") if c[k] not in ("reference", "none")]
    if c["dtype"]:
        parts.append(c["dtype"])
    if c["batch_size"]:
        parts.append(f"b{c['batch_size']}")
    if c.get("rate") is not None:
        parts.append(f"{c['rate']:g} req/s")
    return " ".join(parts)


def _config_label(p: dict[str, Any]) -> str:
    """Everything that identifies a point but its workload."""
    c = p["config"]
    parts = [Path(c["model"]).name, c["routing"]]
    parts += [c[k] for k in ("kernel", "compression", "offload") if c[k] not in ("reference", "none")]
    parts += [c["dtype"] or "ckpt-dtype"] + ([f"b{c['batch_size']}"] if c["batch_size"] else [])
    return " ".join(parts)


def tables(data: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of each report table (step 2)."""
    ok = [p for p in data["points"] if p["status"] == "ok"]
    models = {p["config"]["model"] for p in ok}
    name = (lambda p: f"{Path(p['config']['model']).name} {_label(p)}") if len(models) > 1 else _label
    lat, mem, moe, qe = [], [], [], []
    for p in ok:
        m, w = p["metrics"], p["workload"]
        L = m["latency"]
        lat.append([name(p), f"{w['num_requests']}x {w['prompt_tokens']}/{w['output_tokens']} b{w['batch_size']}",
                    _f(L["ttft_s"]["p50"], 1e3), _f(L["ttft_s"]["p99"], 1e3), _f(L["tpot_s"]["p50"], 1e3),
                    _f(L["tpot_s"]["p90"], 1e3), _f(L["tpot_s"]["p99"], 1e3), _f(L["latency_s"]["p50"]),
                    _f(L["throughput_tok_s"]), _f(L["goodput_req_s"]), _pct(L["slo_attainment"])])
        M = m["memory"]
        rss = _mib(M["peak_rss_bytes"]) + (" (process)" if M.get("peak_rss_scope") == "process" else "")
        mem.append([name(p), _mib(M["weight_bytes"]), f"{M['bits_per_param']:.1f}", _mib(M["kv_cache_bytes"]),
                    rss, _mib(M["gpu_peak_bytes"])])
        E, U = m["moe"], m["utilization"]
        um, ud = U.get("measured") or {}, U.get("datasheet") or {}
        g = lambda u, ph, k: (u.get(ph) or {}).get(k)
        moe.append([name(p), _f(E["distinct_mean_decode"]), _f(E["imbalance_mean"]),
                    _f(g(um, "decode", "bytes_per_s"), 1e-9), _pct(g(um, "decode", "s_mbu")),
                    _pct(g(ud, "decode", "s_mbu")), _f(g(um, "prefill", "flops_per_s"), 1e-9),
                    _pct(g(um, "prefill", "s_mfu")), _pct(g(ud, "prefill", "s_mfu"))])
        q, e = m["quality"], m["energy"]
        qe.append([name(p), *(f"{q[d]['bits_per_byte']:.4f}" for d in sorted(q)),
                   _f(e["j_per_output_token"]) if e["measurable"] else "not measurable",
                   _f(e["joules"]) if e["measurable"] else "-"])
    datasets = sorted(ok[0]["metrics"]["quality"]) if ok else []
    return [
        ("Latency and throughput (TTFT/TPOT in ms, end-to-end in s)",
         ["point", "requests x in/out", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p90", "TPOT p99",
          "e2e p50", "tok/s", "goodput req/s", "SLO met"], lat),
        ("Memory (MiB)", ["point", "weights", "bits/param", "KV cache", "peak RSS", "peak GPU"], mem),
        ("MoE load and sparsity-aware utilisation (S-MBU: decode; S-MFU: prefill)",
         ["point", "distinct experts/layer/step", "imbalance", "decode GB/s", "S-MBU meas.", "S-MBU sheet",
          "prefill GFLOP/s", "S-MFU meas.", "S-MFU sheet"], moe),
        ("Quality (bits per byte, held-out) and energy",
         ["point", *(f"bpb {d}" for d in datasets), "J/token (above idle)", "J total"], qe),
    ]


def summary_table(data: dict[str, Any]) -> str:
    """The latency table as markdown, for the terminal."""
    title, header, rows = tables(data)[0]
    return f"{title}\n\n{_md_table(header, rows)}"


def header_lines(data: dict[str, Any]) -> list[str]:
    """Step 1, as markdown bullet lines."""
    hw, sw, pk, en = data["hardware"], data["software"], data.get("peaks"), data["energy_setup"]
    gpu = hw.get("gpu")
    gpu_text = f"; GPU: {gpu['name']} ({gpu['memory_bytes'] / 2**30:.0f} GiB)" if gpu else ""
    lines = [f"- date: {data['created']}; git commit: `{data['git_commit']}`",
             (f"- device: {hw['device']}; CPU: {hw['cpu']} ({hw['cpu_cores']} cores, "
              f"{hw.get('cpu_threads_used')} torch threads){gpu_text}"),
             f"- software: moeinfer {sw['moeinfer']}, torch {sw['torch']}, Python {sw['python']}, {sw.get('platform')}"]
    if pk:
        me = pk["measured"]
        fl = ", ".join(f"{d} {v / 1e9:.1f} GFLOP/s" for d, v in me["flops"].items())
        lines.append(f"- measured peaks: copy bandwidth {me['bandwidth_bytes_s'] / 1e9:.1f} GB/s; dense matmul {fl}")
        ds = pk.get("datasheet")
        lines.append(f"- datasheet peaks: {ds['name']}: {ds['bandwidth_bytes_s'] / 1e9:.0f} GB/s ({ds['source']})"
                     if ds else f"- datasheet peaks: none ({pk.get('datasheet_note')})")
    else:
        lines.append("- peaks: not measured (S-MBU/S-MFU not available)")
    lines.append(f"- energy: {', '.join(en['sources'])}; idle "
                 + ", ".join(f"{k} {v:.1f} W" for k, v in en["idle_watts"].items())
                 if en["available"] else f"- energy: not measurable here ({en['reason']})")
    cfg = data["config"]
    lines.append(f"- SLO: TTFT <= {cfg['slo']['ttft_s']} s, TPOT <= {cfg['slo']['tpot_s'] * 1e3:.0f} ms; "
                 f"scale {cfg['scale']}; seed {cfg['seed']}; prompts from `{cfg['prompt_source']}`")
    return lines


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _legend(plt: Any, ax: Any, configs: list[str], kinds: list[str], markers: str) -> None:
    """Colour = configuration, grey marker = workload or dataset."""
    handles = [plt.Line2D([], [], color=f"C{i % 10}", marker="o", ls="", label=c) for i, c in enumerate(configs)]
    handles += [plt.Line2D([], [], color="grey", marker=markers[i % len(markers)], ls="", label=k)
                for i, k in enumerate(kinds)]
    ax.legend(handles=handles, fontsize=7, loc="best")


def make_plots(data: dict[str, Any], out: Path) -> dict[str, str | None]:
    """Step 3: {png name: None when written, else the note saying why it was skipped}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [p for p in data["points"] if p["status"] == "ok"]
    notes: dict[str, str | None] = {}
    if not ok:
        return {name: "no successful points" for name in PLOTS}

    def save(fig: Any, name: str) -> None:
        import io

        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        write_text_atomic(out / name, buf.getvalue())
        notes[name] = None

    # Colour = configuration (everything but the workload), marker = workload.
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    configs = list(dict.fromkeys(_config_label(p) for p in ok))
    wls = list(dict.fromkeys(p["config"]["workload"] for p in ok))
    markers = "osD^v<>P*X"
    for p in ok:
        L = p["metrics"]["latency"]
        x, y = L["tpot_s"]["p50"], L["throughput_tok_s"]
        if x is not None and y is not None:
            ax.scatter(x * 1e3, y, color=f"C{configs.index(_config_label(p)) % 10}",
                       marker=markers[wls.index(p["config"]["workload"]) % len(markers)], s=45)
    # A rate sweep of one workload and configuration is a throughput-latency curve: join its points.
    curves: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for p in ok:
        L, rate = p["metrics"]["latency"], p["workload"].get("rate")
        if p["workload"]["arrival"] == "poisson" and L["tpot_s"]["p50"] is not None:
            curves.setdefault((_config_label(p), p["config"]["workload"]), []).append(
                (rate or 0.0, L["tpot_s"]["p50"] * 1e3, L["throughput_tok_s"]))
    for (label, _), pts in curves.items():
        if len(pts) > 1:
            pts.sort()
            ax.plot([x for _, x, _ in pts], [y for _, _, y in pts], color=f"C{configs.index(label) % 10}",
                    lw=1, alpha=0.6)
    _legend(plt, ax, configs, wls, markers)
    ax.set(xlabel="TPOT p50 (ms)", ylabel="throughput (output tokens/s)", title="Throughput vs latency")
    ax.grid(alpha=0.3)
    save(fig, PLOTS[0])

    # Colour = configuration, marker = dataset; one point per configuration and dataset.
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    datasets = sorted({d for p in ok for d in p["metrics"]["quality"]})
    seen = set()
    for p in ok:
        label = _config_label(p)
        if label in seen:
            continue
        seen.add(label)
        q, mem = p["metrics"]["quality"], p["metrics"]["memory"]["weight_bytes"] / 2**20
        for d in sorted(q):
            ax.scatter(mem, q[d]["bits_per_byte"], color=f"C{configs.index(label) % 10}",
                       marker=markers[datasets.index(d) % len(markers)], s=45)
    _legend(plt, ax, configs, datasets, markers)
    ax.set(xlabel="weight memory (MiB)", ylabel="bits per byte (lower is better)", title="Quality vs memory")
    ax.grid(alpha=0.3)
    save(fig, PLOTS[1])

    measured = [p for p in ok if p["metrics"]["energy"]["j_per_output_token"] is not None]
    if measured:
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(measured) + 1.5))
        ax.barh([_label(p) for p in measured], [p["metrics"]["energy"]["j_per_output_token"] for p in measured])
        ax.set(xlabel="joules per output token (above idle)", title="Energy per token")
        save(fig, PLOTS[2])
    else:
        reason = data["energy_setup"]["reason"] or next((p["metrics"]["energy"]["reason"] for p in ok), None)
        notes[PLOTS[2]] = f"energy per token not plotted: not measurable here ({reason})"
        (out / PLOTS[2]).unlink(missing_ok=True)
    return notes


def render_markdown(data: dict[str, Any], notes: dict[str, str | None]) -> str:
    lines = [f"# moeinfer bench: {data['config']['name']}", "", *header_lines(data), ""]
    for title, header, rows in tables(data):
        lines += [f"## {title}", "", _md_table(header, rows), ""]
    wl = {json.dumps(p["workload"], sort_keys=True): p["workload"] for p in data["points"] if p["status"] == "ok"}
    if wl:
        lines += ["## Workloads as run", ""]
        for w in wl.values():
            name = w["name"]
            extra = f" Notes: {'; '.join(w['notes'])}." if w["notes"] else ""
            lines.append(f"- `{name}` v{w['version']} ({w['kind']}, {w['arrival']}"
                         + (f" at {w['rate']} req/s" if w["arrival"] == "poisson" else "")
                         + f"): {w['num_requests']} requests of {w['prompt_tokens']} prompt + "
                           f"{w['output_tokens']} output tokens, batch {w['batch_size']}.{extra}")
        lines.append("")
    failed = [p for p in data["points"] if p["status"] != "ok"]
    if failed:
        lines += ["## Failed points", ""] + [f"- `{p['id']}`: {p['error']}" for p in failed] + [""]
    lines += ["## Plots", ""]
    for name in PLOTS:
        lines.append(f"![{name}]({name})" if notes.get(name) is None else f"- {notes[name]}")
    lines += ["", "Metric definitions: docs/benchmark.md. Raw measurements: results.json.", ""]
    return "\n".join(lines)


def render_html(data: dict[str, Any], notes: dict[str, str | None], out: Path) -> str:
    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             (f"<title>moeinfer bench: {esc(data['config']['name'])}</title><style>"
              "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
              "table{border-collapse:collapse;font-size:13px;margin-bottom:1.5em}"
              "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}td:first-child{text-align:left}"
              "th{background:#f3f3f3}</style></head><body>"),
             f"<h1>moeinfer bench: {esc(data['config']['name'])}</h1><ul>"]
    parts += [f"<li>{esc(line[2:])}</li>" for line in header_lines(data)] + ["</ul>"]
    for title, header, rows in tables(data):
        parts.append(f"<h2>{esc(title)}</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows]
        parts.append("</table>")
    parts.append("<h2>Plots</h2>")
    for name in PLOTS:
        if notes.get(name) is None and (out / name).exists():
            b64 = base64.b64encode((out / name).read_bytes()).decode()
            parts.append(f"<p><img alt='{name}' src='data:image/png;base64,{b64}'></p>")
        else:
            parts.append(f"<p><em>{esc(notes.get(name) or name + ' missing')}</em></p>")
    parts.append("<p>Metric definitions: docs/benchmark.md. Raw measurements: results.json.</p></body></html>")
    return "\n".join(parts)


def write_report(data: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write report.md, report.html and the plots into out_dir; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes = make_plots(data, out)
    write_text_atomic(out / "report.md", render_markdown(data, notes))
    write_text_atomic(out / "report.html", render_html(data, notes, out))
    return [out / "report.md", out / "report.html", *(out / n for n in PLOTS if notes.get(n) is None)]

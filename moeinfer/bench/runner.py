"""Run a sweep: every point's workload, timed and instrumented, into results.json.

A sweep follows these steps:
1. describe the machine (hardware, software, git commit) and measure its peaks: copy bandwidth and
   dense matmul in every dtype the sweep uses (moeinfer.bench.hardware);
2. set up the energy counters and measure idle power (moeinfer.bench.energy);
3. with --resume, keep the finished points of the earlier results.json written with the same settings;
4. for each remaining point (progress bar with a time estimate calibrated on the first model):
   a. load the model once per (model, dtype, kernel, compression, routing, offload), apply the axes,
      warm it up, and evaluate its quality (bits per byte) once;
   b. resolve the workload for this model and device, cut its prompts, draw its arrivals;
   c. reset the memory peaks, start the energy meter, run the workload under instrumentation;
   d. derive the metrics from the raw times (latency, memory, MoE load, S-MBU/S-MFU, energy per token);
   e. rewrite results.json atomically, so an interruption keeps every finished point.
A failing point is recorded with its error and the sweep goes on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from moeinfer.api import load, resolve_model_path
from moeinfer.bench.config import Point, SweepConfig, apply_axes
from moeinfer.bench.energy import EnergyMeter, default_meter
from moeinfer.bench.hardware import git_commit, hardware_info, measure_matmul, measure_peaks, software_info
from moeinfer.bench.instrument import instrument
from moeinfer.bench.latency import summarize
from moeinfer.bench.metrics import (compute_peak, expert_load, gpu_peak_bytes, kv_cache_bytes, peak_rss_bytes,
                                    reset_gpu_peak, reset_peak_rss, sparse_utilization, weight_stats)
from moeinfer.bench.report import write_report
from moeinfer.bench.results import SCHEMA_NAME, SCHEMA_VERSION, finished_points, write_results
from moeinfer.bench.workload_run import run_workload
from moeinfer.bench.workloads import arrival_times, build_prompts, get_workload, resolve, source_token_ids
from moeinfer.engine.generate import generate
from moeinfer.eval import evaluate
from moeinfer.model.shape import ModelShape
from moeinfer.models import SHIPPED
from moeinfer.planning import apply_plan_

log = logging.getLogger(__name__)
RESULTS = "results.json"


class _Loaded:
    """A model transformed for one model_key, with what is measured once per model."""

    def __init__(self, model: Any, quality: dict[str, Any]) -> None:
        self.model = model
        self.shape = ModelShape.from_model(model)
        self.weights = weight_stats(model)
        self.quality = quality
        self.step_s: tuple[float, float] | None = None  # (seconds per prefill token, seconds per decode step)
        self.info = model_identity(model)


def model_identity(model: Any, *, hash_limit: int = 2 << 30) -> dict[str, Any]:
    """Which checkpoint ran: its folder, architecture, and a sha256 of its weight files (of their
    names and sizes only, above `hash_limit` bytes), so results of a changed checkpoint are told apart."""
    import hashlib

    src = Path(model.source_dir) if model.source_dir else None
    files = sorted(src.glob("*.safetensors")) if src else []
    total = sum(f.stat().st_size for f in files)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{f.stat().st_size};".encode())
        if total <= hash_limit:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return dict(path=str(src) if src else None, model_type=model.config.model_type,
                weights_sha256=h.hexdigest()[:16] if files else None,
                hash_of="contents" if total <= hash_limit else "names and sizes", weight_file_bytes=total)


class Sweep:
    def __init__(self, config: SweepConfig, out_dir: str | Path, *, resume: bool = False,
                 meter: EnergyMeter | None = None, progress: bool = True,
                 log_fn: Callable[[str], None] = print, plan: Any = None) -> None:
        self.config, self.out = config, Path(out_dir)
        self.plan = plan  # a moeinfer.planning.Plan applied after the axes; its predictions go beside the measurements
        self.resume, self.progress, self.say = resume, progress, log_fn
        self.device = torch.device(config.device)
        self.meter = meter
        self._models: dict[tuple[Any, ...], _Loaded] = {}
        self._source: dict[tuple[str, str], list[int]] = {}
        self.data: dict[str, Any] = {}

    # 1-2. Machine, peaks, energy.
    def _setup(self, points: list[Point]) -> None:
        cfg = self.config
        dtypes = sorted({p.dtype or "float32" for p in points} | {"float32"})
        peaks = measure_peaks(self.device, dtypes) if cfg.peaks else None
        if self.meter is None:
            self.meter = default_meter(str(self.device), min_window_s=cfg.energy.min_window_s)
        idle = self.meter.measure_idle(cfg.energy.idle_s) if self.meter.available else {}
        self.data = dict(
            schema=SCHEMA_NAME, schema_version=SCHEMA_VERSION, created=datetime.now(UTC).isoformat(),
            git_commit=git_commit(), hardware=hardware_info(self.device), software=software_info(), peaks=peaks,
            energy_setup=dict(available=self.meter.available, sources=[c.name for c in self.meter.counters],
                              idle_watts=idle, reason=self.meter.unavailable or ("; ".join(self.meter.notes) or None)),
            config=cfg.to_dict(), config_digest=cfg.digest(), points=[])

    # 4a.
    def _loaded(self, p: Point) -> _Loaded:
        if p.model_key in self._models:
            return self._models[p.model_key]

        self._models.clear()  # one model in memory at a time
        model = load(p.model, device=self.device, dtype=p.dtype, progress=False)
        apply_axes(model, p)
        if self.plan is not None:

            apply_plan_(model, self.plan)
        if model.tokenizer is None:
            raise ValueError(f"{p.model} has no tokenizer.json: the benchmark's prompts are cut from text")
        quality = {}
        for ds in self.config.quality.datasets:
            r = evaluate(model, ds, max_bytes=self.config.quality.max_bytes, progress=False)
            quality[ds] = dict(bits_per_byte=r.bits_per_byte, perplexity=r.perplexity, tokens=r.tokens,
                               bytes=r.bytes, context=r.context)
        entry = _Loaded(model, quality)
        entry.step_s = self._calibrate(model)
        self._models[p.model_key] = entry
        return entry

    def _calibrate(self, model: Any) -> tuple[float, float]:
        """Warm-up generation, timed: (seconds per prefill token, seconds per decode step at batch 1)."""
        P = min(64, model.config.max_position_embeddings // 2)
        with instrument(model) as ins:
            generate(model, [[1 % model.config.vocab_size] * P], max_new_tokens=8, ignore_eos=True)
        pre = [f.seconds / f.tokens for f in ins.forwards if f.phase == "prefill"]
        dec = [f.seconds for f in ins.forwards if f.phase == "decode"]
        return (min(pre) if pre else 1e-3, sorted(dec)[len(dec) // 2] if dec else 1e-2)

    def _source_ids(self, model: Any, p: Point) -> list[int]:
        key = (p.model, self.config.prompt_source)
        if key not in self._source:
            self._source[key] = source_token_ids(model.tokenizer, self.config.prompt_source)
        return self._source[key]

    def _resolved(self, model: Any, p: Point):
        return resolve(get_workload(p.workload), device_type=self.device.type,
                       context=model.config.max_position_embeddings, scale=self.config.scale,
                       overrides=self.config.workload_overrides.get(p.workload), batch_size=p.batch_size,
                       rate=p.rate)

    def estimate_s(self, p: Point, entry: _Loaded) -> float:
        """Rough seconds for a point: prefill tokens at the calibrated rate, plus decode steps (batched
        decode steps cost more per step; counted at 1.5x the batch-1 step), or the arrival span."""
        w = self._resolved(entry.model, p)
        pre_s, step_s = entry.step_s or (1e-3, 1e-2)
        batches = math.ceil(w.num_requests / w.batch_size)
        batched = 1.5 if w.batch_size > 1 else 1.0
        t = w.num_requests * w.prompt_tokens * pre_s + batches * w.output_tokens * step_s * batched
        if w.arrival == "poisson" and w.rate:
            t = max(t, w.num_requests / w.rate)
        return t

    # 4b-d.
    def run_point(self, p: Point) -> dict[str, Any]:
        t_start = time.perf_counter()
        entry = self._loaded(p)
        model, cfg = entry.model, self.config
        w = self._resolved(model, p)
        prompts = build_prompts(w, self._source_ids(model, p), seed=cfg.seed)
        arrivals = arrival_times(w, seed=cfg.seed)
        rss_scope = "point" if reset_peak_rss() else "process"
        reset_gpu_peak(self.device)
        assert self.meter is not None
        self.meter.start()
        with instrument(model) as ins:
            records = run_workload(model, w, prompts, arrivals)
        energy = self.meter.stop()
        rss, gpu = peak_rss_bytes(), gpu_peak_bytes(self.device)
        timings = [r.timing() for r in records]
        latency = summarize(timings, cfg.slo_obj)
        out_tokens = sum(t.output_tokens for t in timings)
        rows = w.batch_size
        kv = kv_cache_bytes(entry.shape, rows, w.prompt_tokens + w.output_tokens)
        cdt = str(model.dtype).removeprefix("torch.")
        peaks = self.data.get("peaks") or {}
        for d in (cdt, "float32"):  # the checkpoint's dtype, known only now, and fp32 (see compute_peak)
            if peaks and d not in peaks["measured"]["flops"]:
                peaks["measured"]["flops"][d] = measure_matmul(self.device, getattr(torch, d))
        util: dict[str, Any] = {}
        for which in ("measured", "datasheet"):
            pk = peaks.get(which)
            util[which] = (sparse_utilization(ins.forwards, entry.shape, bandwidth=pk["bandwidth_bytes_s"],
                                              flops_peak=compute_peak(pk["flops"], cdt)) if pk else None)
        if not peaks.get("datasheet"):
            util["datasheet_note"] = peaks.get("datasheet_note", "peaks not measured")
        above = energy.above_idle_j
        metrics = dict(
            latency=latency,
            memory=dict(weight_bytes=entry.weights["weight_bytes"], bits_per_param=entry.weights["bits_per_param"],
                        params_total=entry.weights["params_total"], params_active=entry.weights["params_active"],
                        bytes_by_component=entry.weights["bytes_by_component"], kv_cache_bytes=kv,
                        peak_rss_bytes=rss, peak_rss_scope=rss_scope, gpu_peak_bytes=gpu),
            moe=expert_load(ins.forwards, ins.counts),
            utilization=util,
            quality=entry.quality,
            energy=dict(measurable=energy.measurable, reason=energy.reason, joules=energy.total_j,
                        joules_above_idle=above, seconds=energy.seconds,
                        j_per_output_token=above / out_tokens if above is not None and out_tokens else None,
                        j_per_output_token_total=(energy.total_j / out_tokens
                                                  if energy.total_j is not None and out_tokens else None)),
        )
        raw = dict(requests=[r.to_dict() for r in records], forwards=[f.to_list() for f in ins.forwards],
                   energy=energy.to_dict(), peak_rss_bytes=rss, gpu_peak_bytes=gpu)
        wl = {**w.to_dict(), "description": get_workload(p.workload).description}
        if self.plan is not None and self.plan.predicted is not None:
            tpot = latency["tpot_s"]["p50"]
            metrics["plan"] = dict(configuration=self.plan.describe(), predicted=vars(self.plan.predicted),
                                   measured_decode_tok_s=min(w.batch_size, w.num_requests) / tpot if tpot > 0 else None)
        return dict(id=p.id, config=p.to_dict(), status="ok", error=None, seconds=time.perf_counter() - t_start,
                    model=entry.info, workload=wl, raw=raw, metrics=metrics)

    # 3-4.
    def run(self) -> dict[str, Any]:
        points = self.config.expand()
        ids = [p.id for p in points]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"{self.config.source}: the sweep lists the same point more than once: {dup[:3]}")

        missing = [m for m in self.config.models if not resolve_model_path(m).exists()]
        if missing:
            raise FileNotFoundError(f"{self.config.source}: model(s) not found: {', '.join(missing)} (a checkpoint "
                                    f"folder, or a shipped model name: {', '.join(SHIPPED)})")
        path = self.out / RESULTS
        done = finished_points(path, self.config.digest()) if self.resume else {}
        if done:
            self.say(f"resuming: {len([i for i in ids if i in done])} of {len(points)} points already in {path}")
        self._setup(points)
        todo = [p for p in points if p.id not in done]
        by_id: dict[str, dict[str, Any]] = {i: done[i] for i in ids if i in done}
        self._write(points, by_id)
        if not todo:
            return self.data
        # 4. The first model calibrates the time estimate.
        # 4. The first model calibrates the time estimate (its load + quality evaluation time counts for
        #    every other model configuration; a model of another size will differ).
        t0 = time.perf_counter()
        try:
            first: _Loaded | None = self._loaded(todo[0])
        except Exception:  # recorded as the point's error below
            first = None
        load_s = time.perf_counter() - t0
        est = {p.id: (self.estimate_s(p, first) if first and p.model == todo[0].model else None) for p in todo}
        known = [e for e in est.values() if e is not None]
        fill = sum(known) / len(known) if known else 1.0
        est = {k: (v if v is not None else fill) for k, v in est.items()}
        keys = list(dict.fromkeys(p.model_key for p in todo))
        total = sum(est.values()) + load_s * (len(keys) - 1)
        self.say(f"{len(todo)} points, {len(keys)} model configuration(s) on {self.device}: estimated "
                 f"~{_fmt_s(total)} more (first model load + quality evaluation took {load_s:.0f} s)")
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=round(total, 1), unit="s(est)", desc="bench",
                       bar_format="{l_bar}{bar}| [{elapsed}<{remaining} estimated{postfix}]")
        prev_key = todo[0].model_key
        for p in todo:
            if bar is not None:
                bar.set_postfix_str(p.id, refresh=True)
                if p.model_key != prev_key:
                    bar.update(min(round(load_s, 1), bar.total - bar.n))
                    prev_key = p.model_key
            try:
                by_id[p.id] = self.run_point(p)
            except Exception as e:  # one failing point must not lose the others
                log.exception("point %s failed", p.id)
                by_id[p.id] = dict(id=p.id, config=p.to_dict(), status="error", error=f"{type(e).__name__}: {e}",
                                   seconds=0.0, workload=None, raw=None, metrics=None)
            self._write(points, by_id)
            if bar is not None:
                bar.update(min(round(est[p.id], 1), bar.total - bar.n))  # estimates may overshoot
        if bar is not None:
            bar.close()
        return self.data

    def _write(self, points: list[Point], by_id: dict[str, dict[str, Any]]) -> None:
        self.data["points"] = [by_id[p.id] for p in points if p.id in by_id]
        write_results(self.data, self.out / RESULTS)


def _fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def run_sweep(config: SweepConfig, out_dir: str | Path, *, resume: bool = False, report: bool = True,
              progress: bool = True, meter: EnergyMeter | None = None,
              log_fn: Callable[[str], None] = print, plan: Any = None) -> dict[str, Any]:
    """Run `config`, write results.json (and report.md, report.html, plots) into `out_dir`; `plan`: a
    moeinfer.planning.Plan applied to every model, its predictions recorded beside the measurements."""
    data = Sweep(config, out_dir, resume=resume, meter=meter, progress=progress, log_fn=log_fn, plan=plan).run()
    if report:
        write_report(data, out_dir)
    return data

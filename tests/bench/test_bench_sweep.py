"""A tiny end-to-end sweep on the CPU (2 routing configs x 2 scaled-down workloads), resume, compare."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from moeinfer.bench.config import SweepConfig
from moeinfer.bench.energy import EnergyMeter, rapl_zones
from moeinfer.bench.results import read_results, write_results
from moeinfer.bench.runner import Sweep, run_sweep


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hf_peers import save_hf_checkpoint
    from tiny_tokenizer import write_tokenizer

    path = tmp_path_factory.mktemp("bench") / "tiny"
    save_hf_checkpoint("mixtral", path, vocab_size=300)
    write_tokenizer(path)
    return path


def fake_meter(root: Path) -> EnergyMeter:
    """A RAPL package whose counter does not move: 0 J, but measurable (window >= 0 s)."""
    d = root / "intel-rapl:0"
    d.mkdir(parents=True, exist_ok=True)
    (d / "name").write_text("package-0")
    (d / "energy_uj").write_text("1000")
    (d / "max_energy_range_uj").write_text("262143328850")
    return EnergyMeter(rapl_zones(root), interval_s=0, min_window_s=0)


def sweep_config(ckpt: Path, workloads: list[str], **kw) -> SweepConfig:
    return SweepConfig(name="test", models=[str(ckpt)], axes={"workload": workloads, "routing": ["default", "top-k:1"]},
                       scale=0.05, quality={"datasets": ["english"], "max_bytes": 1500},
                       energy={"min_window_s": 0, "idle_s": 0}, **kw)


@pytest.fixture(scope="module")
def swept(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("out")
    run_sweep(sweep_config(ckpt, ["chat", "server"]), out, progress=False, log_fn=lambda s: None,
              meter=fake_meter(out / "rapl"))
    return out


def test_sweep_writes_results_and_reports(swept: Path) -> None:
    data = read_results(swept / "results.json")  # validates against the schema
    ids = [p["id"] for p in data["points"]]
    assert len(ids) == 4 and all(p["status"] == "ok" for p in data["points"])
    assert {(p["config"]["workload"], p["config"]["routing"]) for p in data["points"]} == {
        ("chat", "default"), ("chat", "top-k:1"), ("server", "default"), ("server", "top-k:1")}
    assert data["peaks"]["datasheet"] is None and "generic CPU" in data["peaks"]["datasheet_note"]
    assert data["peaks"]["measured"]["bandwidth_bytes_s"] > 0 and data["git_commit"]
    for p in data["points"]:
        m, raw, w = p["metrics"], p["raw"], p["workload"]
        assert len(raw["requests"]) == w["num_requests"]
        assert all(len(r["token_times"]) == w["output_tokens"] for r in raw["requests"])
        assert m["latency"]["output_tokens"] == w["num_requests"] * w["output_tokens"]
        assert m["moe"]["distinct_mean_decode"] >= 1
        assert m["utilization"]["measured"]["decode"]["s_mbu"] > 0
        assert m["quality"]["english"]["bits_per_byte"] > 0
        assert m["energy"]["measurable"] and m["energy"]["joules"] == 0
        assert p["model"]["weights_sha256"]
    topk1 = [p for p in data["points"] if p["config"]["routing"] == "top-k:1"]
    assert all(p["metrics"]["moe"]["distinct_mean_decode"] <= 1 for p in topk1)  # batch-1 decode, top-1
    md = (swept / "report.md").read_text()
    for p in data["points"]:
        assert f"{p['config']['workload']} {p['config']['routing']}" in md
    html = (swept / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html
    assert (swept / "throughput_latency.png").stat().st_size > 1000
    assert (swept / "energy_per_token.png").exists()


def test_resume_skips_finished_points(ckpt: Path, swept: Path, tmp_path: Path, monkeypatch) -> None:
    data = read_results(swept / "results.json")
    interrupted = copy.deepcopy(data)
    interrupted["points"] = interrupted["points"][:1]  # as if stopped after the first point
    write_results(interrupted, tmp_path / "results.json")
    ran: list[str] = []
    real = Sweep.run_point
    fail = {data["points"][2]["id"]}

    def counting(self, p):
        ran.append(p.id)
        if p.id in fail:
            raise RuntimeError("boom")
        return real(self, p)

    monkeypatch.setattr(Sweep, "run_point", counting)
    cfg = sweep_config(ckpt, ["chat", "server"], peaks=False)
    out = run_sweep(cfg, tmp_path, resume=True, progress=False, report=False, log_fn=lambda s: None,
                    meter=fake_meter(tmp_path / "rapl"))
    assert len(ran) == 3 and data["points"][0]["id"] not in ran
    assert out["points"][0] == data["points"][0]  # kept as it was
    saved = read_results(tmp_path / "results.json")["points"]
    assert [p["status"] for p in saved] == ["ok", "ok", "error", "ok"]  # a failing point does not stop the sweep
    assert saved[2]["error"] == "RuntimeError: boom"
    fail.clear()
    ran.clear()
    run_sweep(cfg, tmp_path, resume=True, progress=False, report=False, log_fn=lambda s: None,
              meter=fake_meter(tmp_path / "rapl"))
    assert ran == [data["points"][2]["id"]]  # only the failed point runs again
    assert all(p["status"] == "ok" for p in read_results(tmp_path / "results.json")["points"])
    changed = sweep_config(ckpt, ["chat", "server"], peaks=False, seed=5)
    with pytest.raises(ValueError, match="different sweep settings"):
        run_sweep(changed, tmp_path, resume=True, progress=False, report=False, log_fn=lambda s: None)


def test_compare_prints_ratios(swept: Path, tmp_path: Path, capsys) -> None:
    from moeinfer.cli import main

    b = json.loads((swept / "results.json").read_text())
    b["points"][0]["metrics"]["latency"]["throughput_tok_s"] *= 2
    b["points"][0]["metrics"]["latency"]["ttft_s"]["p50"] *= 2
    b["points"].pop()
    write_results(b, tmp_path / "b.json")
    assert main(["bench", "compare", str(swept), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    pid = b["points"][0]["id"]
    block = out.split(pid, 1)[1]
    assert "throughput (tok/s)" in block and "2.000x better" in block
    assert "TTFT p50 (s)" in block and "2.000x worse" in block
    assert "only in A:" in out


def test_cli_runs_a_sweep_file(ckpt: Path, tmp_path: Path, capsys) -> None:
    from moeinfer.cli import main

    (tmp_path / "s.yaml").write_text(
        f"name: cli\nmodels: [{ckpt}]\naxes: {{workload: [decode-b1], dtype: [float32]}}\nscale: 0.05\n"
        "peaks: false\nquality: {datasets: [python], max_bytes: 1000}\nenergy: {min_window_s: 1, idle_s: 0}\n")
    assert main(["bench", "--config", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    data = read_results(tmp_path / "o" / "results.json")
    assert [p["config"]["workload"] for p in data["points"]] == ["decode-b1"]
    assert data["peaks"] is None
    md = (tmp_path / "o" / "report.md").read_text()
    assert "not measurable" in md  # no RAPL here, or a window under 1 s
    assert main(["bench", "--config", str(tmp_path / "s.yaml"), "--workload", "nope"]) == 1
    assert "unknown workload 'nope'" in capsys.readouterr().err


def test_report_of_a_gpu_run(swept: Path, tmp_path: Path) -> None:
    """The report's GPU paths (GPU name, datasheet peaks and S-MBU against them) on a doctored result."""
    from moeinfer.bench.hardware import datasheet_peak
    from moeinfer.bench.report import write_report

    data = read_results(swept / "results.json")
    data["hardware"]["gpu"] = dict(name="NVIDIA H100 80GB HBM3", memory_bytes=80 * 2**30, capability="9.0", count=1)
    sheet = datasheet_peak("NVIDIA H100 80GB HBM3")
    assert sheet["name"] == "H100 SXM" and datasheet_peak("NVIDIA H100 PCIe")["name"] == "H100 PCIe"
    assert datasheet_peak("AMD EPYC") is None
    data["peaks"]["datasheet"], data["peaks"]["datasheet_note"] = sheet, None
    for p in data["points"]:
        p["metrics"]["utilization"]["datasheet"] = {"decode": {"s_mbu": 0.25}, "prefill": {"s_mfu": 0.5}}
        p["metrics"]["memory"]["gpu_peak_bytes"] = 3 * 2**20
    write_report(data, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "GPU: NVIDIA H100 80GB HBM3 (80 GiB)" in md and "H100 SXM: 3350 GB/s" in md
    assert "| 25.0% |" in md and "| 50.0% |" in md and "| 3.0 |" in md


def test_every_axis_transforms_the_model(ckpt: Path, tmp_path: Path) -> None:
    """The kernel, compression, routing and offload axes run moeinfer's real transforms."""
    points = [{"kernel": "cpu"}, {"compression": "int8"}, {"routing": "top-p:0.5"}, {"offload": "lru:2"}]
    cfg = SweepConfig(name="axes", models=[str(ckpt)], mode="list", axes={"workload": ["chat"]}, points=points,
                      scale=0.05, quality={"datasets": ["english"], "max_bytes": 800},
                      energy={"min_window_s": 0, "idle_s": 0})
    run_sweep(cfg, tmp_path, progress=False, log_fn=lambda s: None, meter=fake_meter(tmp_path / "rapl"))
    data = read_results(tmp_path / "results.json")
    assert [p["status"] for p in data["points"]] == ["ok"] * 4
    got = {(p["config"]["kernel"], p["config"]["compression"], p["config"]["routing"], p["config"]["offload"])
           for p in data["points"]}
    assert got == {("cpu", "none", "default", "none"), ("reference", "int8", "default", "none"),
                   ("reference", "none", "top-p:0.5", "none"), ("reference", "none", "default", "lru:2")}
    mem = {(p["config"]["kernel"], p["config"]["compression"]): p["metrics"]["memory"] for p in data["points"]
           if p["config"]["routing"] == "default" and p["config"]["offload"] == "none"}
    # int8 experts are stored packed: fewer bytes, same parameters, fewer bits per parameter
    assert mem[("reference", "int8")]["weight_bytes"] < 0.7 * mem[("cpu", "none")]["weight_bytes"]
    assert mem[("reference", "int8")]["bits_per_param"] < mem[("cpu", "none")]["bits_per_param"]

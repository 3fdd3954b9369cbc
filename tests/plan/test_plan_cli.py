"""`moeinfer plan` and `--plan` on the model-loading commands (a synthetic machine profile in the cache:
tests never time anything)."""

from __future__ import annotations

import json

import pytest
from plan_helpers import synthetic_profile

from moeinfer.cli import main
from moeinfer.planning import Plan, PlanOffload
from moeinfer.planning.profile import profile_path
from moeinfer.planning.speed_probe import MachineSpeed


@pytest.fixture
def cached_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEINFER_CACHE_DIR", str(tmp_path / "cache"))
    path = profile_path("cpu")
    path.parent.mkdir(parents=True)
    prof = synthetic_profile()
    path.write_text(json.dumps({**prof.to_dict(), "key": path.stem.split("-", 1)[1]}))
    return path


def test_plan_command_writes_a_plan(tmp_path, cached_profile, capsys):
    out = tmp_path / "plan.yaml"
    assert main(["plan", "--model", "tiny", "--memory", "200MB", "--precisions", "bf16", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "chosen" in text and "decode tok/s" in text and "#2" in text
    p = Plan.load(out)
    assert p.budget_bytes == 200 * 10**6 and set(p.precisions) == {"bf16"} and p.predicted is not None
    assert p.predicted.memory_bytes <= p.budget_bytes
    # an existing file is not overwritten without --force
    before = out.read_text()
    assert main(["plan", "--model", "tiny", "--memory", "100MB", "--precisions", "bf16", "--out", str(out)]) == 1
    assert "--force" in capsys.readouterr().err and out.read_text() == before
    # bad budget and bad quality loss are clear errors
    assert main(["plan", "--model", "tiny", "--memory", "lots", "--precisions", "bf16"]) == 1
    assert "memory budget 'lots' is not a size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "--model", "tiny", "--memory", "1GB", "--max-quality-loss", "much"])


def test_generate_and_eval_with_a_plan_file(tmp_path, capsys):
    p = Plan(model="tiny", device="cpu", budget_bytes=10**8, objective="latency", precisions=("bf16",) * 4,
             offload=PlanOffload(tier="disk", cache_experts=6, policy="lfu"), kernel="reference")
    path = p.save(tmp_path / "plan.yaml")
    assert main(["generate", "--plan", str(path), "-n", "3", "--no-stream", "The"]) == 0
    assert main(["eval", "--plan", str(path), "english", "--max-bytes", "400", "--no-progress"]) == 0
    assert "bits/byte" in capsys.readouterr().out
    # --plan with --offload is refused; a bad plan file names itself
    assert main(["generate", "--plan", str(path), "--offload", "-n", "1", "The"]) == 1
    assert "drop --offload" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("model: tiny\n")
    assert main(["generate", "--plan", str(tmp_path / "bad.yaml"), "-n", "1", "The"]) == 1
    assert "bad.yaml" in capsys.readouterr().err


def test_bench_reports_predicted_beside_measured(tmp_path, capsys):
    from moeinfer.bench.results import read_results
    from moeinfer.planning import Prediction

    p = Plan(model="tiny", device="cpu", budget_bytes=10**8, objective="latency", precisions=("int8",) * 4,
             kernel="auto", predicted=Prediction(decode_tok_s=42.0, prefill_tok_s=420.0, memory_bytes=10**7,
                                                 quality_loss=0.001))
    plan_file = p.save(tmp_path / "plan.yaml")
    (tmp_path / "s.yaml").write_text(
        "name: plan\nmodels: [tiny]\naxes: {workload: [decode-b1]}\nscale: 0.05\n"
        "peaks: false\nquality: {datasets: [python], max_bytes: 500}\nenergy: {min_window_s: 1, idle_s: 0}\n")
    assert main(["bench", "--config", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "o"), "--no-progress",
                 "--plan", str(plan_file)]) == 0
    assert "decode predicted 42.0 tok/s, measured" in capsys.readouterr().out
    [point] = read_results(tmp_path / "o" / "results.json")["points"]
    got = point["metrics"]["plan"]
    assert got["configuration"] == p.describe() and got["predicted"]["decode_tok_s"] == 42.0
    assert got["measured_decode_tok_s"] > 0


def _plan_auto(monkeypatch, free_bytes: int, **overrides):
    """Run `generate --plan auto` with `free_bytes` free; return the plans the planner made."""
    import moeinfer.planning.planner as planner_mod
    import moeinfer.planning.sizes as sizes

    chosen = []
    real_plan = planner_mod.plan

    def recording_plan(*a, **k):
        chosen.append(real_plan(*a, **{**k, **overrides}))
        return chosen[-1]

    monkeypatch.setattr(sizes, "available_memory", lambda device: free_bytes)
    monkeypatch.setattr(planner_mod, "plan", recording_plan)
    assert main(["generate", "--plan", "auto", "-n", "2", "--no-stream", "The"]) == 0
    return chosen


def test_generate_with_plan_auto_plans_for_the_free_memory(cached_profile, monkeypatch, capsys):
    """`--plan auto` plans, before loading, for the memory free on the device, then loads the model
    straight into the plan (bf16 only here: the quality measurement is the slow test's)."""
    [p] = _plan_auto(monkeypatch, 200 * 10**6, precisions=("bf16",))
    assert p.device == "cpu" and p.model == "tiny" and set(p.precisions) == {"bf16"}
    assert p.budget_bytes == 200 * 10**6 and p.predicted.memory_bytes <= p.budget_bytes
    assert capsys.readouterr().out.strip()


def test_plan_auto_with_every_precision(cached_profile, monkeypatch):
    """The default search (bf16, int8, int4 presets) measures every precision's quality: the int4
    preset's algorithm "auto" is resolved before quantizing (it reached the quantizer unresolved)."""
    [p] = _plan_auto(monkeypatch, 100 * 10**6)
    assert p.predicted.memory_bytes <= p.budget_bytes
    assert set(p.precisions) <= {"bf16", "int8", "int4"} and p.predicted.quality_loss is not None


def test_plan_quality_from_stands_in_for_a_model_too_big_to_measure(tmp_path, cached_profile, monkeypatch, capsys):
    """--quality-from: the model is not loaded (too big); the named model's measured quality stands in."""
    from dataclasses import replace

    from plan_helpers import toy_quality

    import moeinfer.planning.planner as planner

    seen: list = []
    monkeypatch.setattr(planner, "_load_for_measurement", lambda path, sizes: None)
    monkeypatch.setattr(planner, "cached_quality", lambda path, *a, **k: (seen.append(path),
                        replace(toy_quality(4), fit={"int8": 2.002, "int4": 2.01}))[1])
    out = tmp_path / "plan.yaml"
    # 85 MB: every expert at int4 fits resident (83.3 MB), at bf16 not (93.3 MB)
    assert main(["plan", "--model", "tiny", "--memory", "85MB", "--quality-from", "tiny", "--out", str(out)]) == 0
    assert seen == ["tiny"] and "stand-in: tiny's measured loss" in capsys.readouterr().out
    assert "int4" in Plan.load(out).precisions
    assert main(["plan", "--model", "tiny", "--memory", "85MB", "--out", str(out), "--force"]) == 0
    assert set(Plan.load(out).precisions) == {"bf16"} and seen == ["tiny"]  # no stand-in: bf16 only


def test_plan_probes_the_machine_unless_told_not_to(tmp_path, cached_profile, monkeypatch):
    """The cached profile is this machine's: its predictions are scaled by the probe's speed (scripted
    here), or taken as they are with --no-probe."""
    import moeinfer.planning.planner as planner

    monkeypatch.setattr(planner, "machine_speed", lambda *a: MachineSpeed(prompt=3.0, decode=2.0))
    out = tmp_path / "plan.yaml"
    assert main(["plan", "--model", "tiny", "--memory", "200MB", "--precisions", "bf16", "--out", str(out)]) == 0
    probed = Plan.load(out).predicted
    assert main(["plan", "--model", "tiny", "--memory", "200MB", "--precisions", "bf16", "--no-probe",
                 "--out", str(out), "--force"]) == 0
    plain = Plan.load(out).predicted
    assert (probed.machine_speed, probed.machine_decode_speed, plain.machine_speed) == (3.0, 2.0, 1.0)
    assert probed.decode_tok_s == pytest.approx(2.0 * plain.decode_tok_s)
    assert probed.prefill_tok_s == pytest.approx(3.0 * plain.prefill_tok_s)

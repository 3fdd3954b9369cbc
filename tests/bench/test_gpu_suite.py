"""benchmarks/gpu_suite.py: the CPU dry run wires every part end to end (issue 15, item 2), and the
suite's own machinery (part selection, deadlines, failures kept per part, targets) behaves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402
from gpu_suite_parts import PARTS, Context  # noqa: E402
from gpu_suite_parts.common import Part  # noqa: E402
from gpu_suite_parts.targets import evaluate  # noqa: E402

TRACES = ROOT.parent / "shared" / "data" / "traces" / "mixtral-8x7b-instruct"


def mixtral_traces(folder: Path) -> Path:
    """The shared Mixtral routing traces, or, where a checkout has none beside it, stand-ins in their
    format (2 requests x 24 tokens x 32 layers, top-2 of 8) so the dry run never skips part f."""
    if (TRACES / "humaneval_2_routing.jsonl").is_file():
        return TRACES
    import random

    rng = random.Random(0)
    folder.mkdir()
    for name in ("humaneval", "gsm8k"):
        with open(folder / f"{name}_2_routing.jsonl", "w") as f:
            for problem in range(2):
                for token in range(24):
                    for layer in range(32):
                        p = rng.uniform(0.5, 0.9)
                        f.write(json.dumps({"dataset": name, "problem_id": problem, "layer": layer,
                                            "experts": rng.sample(range(8), 2), "gating_probs": [p, 1 - p],
                                            "token_idx": token}) + "\n")
    return folder


def test_dry_run_wires_every_part(tmp_path):
    """The whole suite on the CPU (tiny shapes, Triton's interpreter): every part ok, both files written,
    each part's result holding what its table needs. About 30 s on a quiet 2-core machine."""
    out = tmp_path / "gpu-results"
    traces = mixtral_traces(tmp_path / "traces")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the suite sets it itself
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--dry-run", "--out", str(out),
                           "--traces", str(traces)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert (out / "results.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    status = {name: r["status"] for name, r in res["parts"].items()}
    errors = {name: r.get("error") for name, r in res["parts"].items() if r["status"] != "ok"}
    assert status == {name: "ok" for name in PARTS} == {n: "ok" for n in ("env", "tests", "layer", "decode", "int4",
                                                                           "offload")}, errors
    assert proc.returncode == 0
    assert res["suite"]["dry_run"] is True
    p = res["parts"]
    assert p["env"]["limits"]["copy_bytes_s"] > 0 and p["env"]["limits"]["h2d_bytes_s"] > 0
    assert p["tests"]["counts"].get("skipped", 0) > 100 and not p["tests"]["unexpected_skips"]
    backends = {r["backend"] for r in p["layer"]["rows"]}
    assert {"moeinfer triton", "torch._grouped_mm", "transformers eager"} <= backends
    assert {r["shape"].split(" ")[0] for r in p["layer"]["rows"]} == {"Mixtral-8x7B", "Qwen3-30B-A3B", "OLMoE-1B-7B"}
    assert [r["system"].split(" ")[0] for r in p["decode"]["rows"]] == ["moeinfer", "transformers"]
    assert [r["experts"][:4] for r in p["int4"]["rows"]] == ["bf16", "int4"]
    assert "QuantizedExperts" in p["int4"]["rows"][1]["experts"]
    for name in ("bf16", "int4"):  # where decode time goes: kernels named, shares summing to at most 1
        prof = p["int4"][f"profile_{name}"]
        assert "error" not in prof, prof
        assert prof["rows"] and all(r["calls"] > 0 and r["total_us"] > 0 for r in prof["rows"])
        assert 0 < sum(r["share"] for r in prof["rows"]) <= 1 + 1e-9
    live = p["offload"]["live"]
    assert [r["label"] for r in live] == ["on-demand", "best"]
    assert all(r["tokens"] == r["generated"] and r["hits"] + r["misses"] > 0 for r in live)
    assert p["offload"]["host_us_per_layer"] >= 0 and "prediction_error_calibrated" in live[1]
    assert {t["target"] for t in res["targets"]} and all(t["value"] is not None for t in res["targets"]
                                                         if not t["target"].startswith("layer, 4096"))
    md = (out / "summary.md").read_text()
    assert "DRY RUN" in md and "No number below is a GPU measurement" in md
    for part in PARTS.values():
        assert f"## {part.letter}. {part.title} ({part.name}: ok)" in md


def test_select_parts_by_name_or_letter():
    assert gpu_suite.select_parts(None, None) == ["env", "tests", "layer", "decode", "int4", "offload"]
    assert gpu_suite.select_parts("layer,a", None) == ["env", "layer"]
    assert gpu_suite.select_parts(None, "tests,f") == ["env", "layer", "decode", "int4"]
    with pytest.raises(SystemExit, match=r"--skip: unknown part 'gpu'; valid: a/env, b/tests"):
        gpu_suite.select_parts(None, "gpu")


def test_existing_results_are_not_overwritten(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(SystemExit, match="exists: pass --overwrite"):
        gpu_suite.main(["--dry-run", "--out", str(tmp_path), "--only", "env"])
    assert (tmp_path / "results.json").read_text() == "{}"


@pytest.fixture
def fake_part():
    """Register a part for one test, removed afterwards."""
    added = []

    def add(name, run):
        PARTS[name] = Part(name, "z", name, 1.0, run, lambda r: "")
        added.append(name)

    yield add
    for name in added:
        PARTS.pop(name)


def _ctx(tmp_path, timeout):
    return Context(dry_run=True, device="cpu", out_dir=tmp_path, deadline=time.time() + timeout, traces=tmp_path,
                   repo=ROOT, scratch=tmp_path)


def test_a_part_past_its_deadline_is_killed_and_keeps_its_rows(tmp_path, fake_part):
    def slow(ctx):
        ctx.save({"rows": [1, 2]})
        time.sleep(60)
        return {"rows": [1, 2, 3]}

    fake_part("slow", slow)
    t0 = time.monotonic()
    r = gpu_suite.run_part("slow", _ctx(tmp_path, 2.0), 2.0)
    assert time.monotonic() - t0 < 30
    assert r["status"] == "timeout" and r["rows"] == [1, 2] and "deadline" in r["error"]


def test_a_failing_part_is_recorded_with_its_traceback(tmp_path, fake_part):
    def broken(ctx):
        ctx.save({"rows": ["first"]})
        raise ValueError("shape mismatch in part z")

    fake_part("broken", broken)
    r = gpu_suite.run_part("broken", _ctx(tmp_path, 30.0), 30.0)
    assert r["status"] == "error" and r["rows"] == ["first"]
    assert r["error"] == "ValueError: shape mismatch in part z" and "in broken" in r["traceback"]


def test_a_crashing_part_is_recorded(tmp_path, fake_part):
    fake_part("crash", lambda ctx: os._exit(3))
    r = gpu_suite.run_part("crash", _ctx(tmp_path, 30.0), 30.0)
    assert r["status"] == "crashed" and "exit code 3" in r["error"]


def test_targets_read_off_results():
    layer = [dict(shape="Mixtral-8x7B", tokens=1, backend="moeinfer triton", seconds=1.0, pct_bandwidth=80.0,
                  pct_matmul=1.0),
             dict(shape="Mixtral-8x7B", tokens=1, backend="moeinfer triton, CUDA graph", seconds=0.5,
                  pct_bandwidth=90.0, pct_matmul=2.0),
             dict(shape="Mixtral-8x7B", tokens=1, backend="transformers eager", seconds=2.0, pct_bandwidth=1.0,
                  pct_matmul=1.0),
             dict(shape="Mixtral-8x7B", tokens=4096, backend="moeinfer triton", seconds=3.0, pct_bandwidth=1.0,
                  pct_matmul=55.0),
             dict(shape="Mixtral-8x7B", tokens=4096, backend="transformers grouped_mm", seconds=2.0,
                  pct_bandwidth=1.0, pct_matmul=70.0)]
    res = {"layer": {"rows": layer},
           "offload": {"live": [dict(label="on-demand", tok_s=2.0, prediction_error=-0.1),
                                dict(label="best", tok_s=6.0, prediction_error=0.3)], "best_over_on_demand": 3.0}}
    got = {t["target"]: (t["value"], t["holds"]) for t in evaluate(res)}
    assert got["Mixtral layer, batch 1: % of measured copy bandwidth"] == (90.0, True)
    assert got["layer: x transformers' best at 1-64 tokens (worst shape)"] == (4.0, True)
    assert got["layer: x transformers' best at every size (worst)"] == (pytest.approx(2 / 3), False)
    assert got["layer, 4096-token prefill: % of dense matmul (worst shape)"] == (55.0, False)
    assert got["decode: % of roofline"] == (None, None)
    assert got["offloaded Mixtral-8x7B at 24 GB: tok/s"] == (6.0, True)
    assert got["offloaded: x on-demand"] == (3.0, True)
    assert got["simulator error (worst live run)"] == (pytest.approx(30.0), False)
    # with the host time calibrated on the on-demand run, the out-of-sample run's calibrated error counts
    res["offload"]["host_us_per_layer"] = 4000.0
    res["offload"]["live"][0]["prediction_error"] = 0.0  # fitted: not a check
    res["offload"]["live"][1]["prediction_error_calibrated"] = -0.12
    got = {t["target"]: (t["value"], t["holds"]) for t in evaluate(res)}
    assert got["simulator error (worst live run)"] == (pytest.approx(12.0), True)


def test_part_b_collects_every_file_with_gpu_tests():
    """Part b's file list is every test file, in any folder, that marks a test `gpu` (the first GPU run
    collected only the top-level file: the subfolders' GPU tests never ran)."""
    from gpu_suite_parts.gpu_tests import gpu_test_files

    expected = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                      if "pytest.mark.gpu" in p.read_text())
    files = gpu_test_files(ROOT)
    assert files == expected and len(files) >= 4
    assert {"tests/test_gpu_paths.py", "tests/kernels/test_kernels_triton_quant.py",
            "tests/offload/test_offload_gpu.py", "tests/engine/test_static_decode.py"} <= set(files)

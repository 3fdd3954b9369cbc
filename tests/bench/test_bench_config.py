"""Sweep configs (axes, clear errors for what does not exist yet) and workloads (exact, seeded prompts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeinfer.bench.config import Point, SweepConfig, load_sweep
from moeinfer.bench.workloads import (
    Workload,
    arrival_times,
    build_prompts,
    get_workload,
    resolve,
    workloads,
)


def test_shipped_workloads_are_versioned() -> None:
    table = workloads()
    assert {"decode-b1", "chat", "long-prefill", "offline-batch", "server"} <= set(table)
    assert all(w.version >= 1 for w in table.values())
    assert table["chat"].prompt_tokens == 128 and table["chat"].output_tokens == 128
    assert table["server"].arrival == "poisson" and table["server"].rate > 0
    with pytest.raises(ValueError, match="unknown workload 'nope'; available: decode-b1"):
        get_workload("nope")


def test_resolve_scales_down_on_cpu_and_caps_at_the_context() -> None:
    w = resolve(get_workload("long-prefill"), device_type="cpu", context=4096 + 64)
    assert w.prompt_tokens == 1024 and any("scaled down on cpu" in n for n in w.notes)
    assert resolve(get_workload("long-prefill"), device_type="cuda", context=8192).prompt_tokens == 4096
    capped = resolve(get_workload("chat"), device_type="cpu", context=200)
    assert capped.prompt_tokens + capped.output_tokens == 200
    assert capped.prompt_tokens == 100 and any("capped by the model's context of 200" in n for n in capped.notes)
    small = resolve(get_workload("offline-batch"), device_type="cpu", context=256, scale=0.1, batch_size=4)
    assert (small.prompt_tokens, small.output_tokens, small.num_requests, small.batch_size) == (13, 6, 3, 3)
    with pytest.raises(ValueError, match="not overridable"):
        resolve(get_workload("chat"), device_type="cpu", context=256, overrides={"temperature": 1})


def test_prompts_and_arrivals_are_exact_and_seeded() -> None:
    w = resolve(get_workload("server"), device_type="cpu", context=256)
    ids = list(range(1000))
    a, b = build_prompts(w, ids, seed=0), build_prompts(w, ids, seed=0)
    assert a == b and len(a) == w.num_requests and all(len(p) == w.prompt_tokens for p in a)
    assert build_prompts(w, ids, seed=1) != a
    t = arrival_times(w, seed=0)
    assert t == arrival_times(w, seed=0) and t[0] == 0.0 and all(x <= y for x, y in zip(t, t[1:]))
    assert 0.2 < (len(t) - 1) / t[-1] / w.rate < 5  # roughly `rate` requests per second
    with pytest.raises(ValueError, match="fewer than"):
        build_prompts(w, ids[:10], seed=0)


def test_bad_workload_definitions() -> None:
    with pytest.raises(ValueError, match="kind must be one of sequential, engine"):
        Workload("x", 1, "", "bogus", 8, 8, 1, 1)
    with pytest.raises(ValueError, match="Poisson arrivals need kind: engine and a rate"):
        Workload("x", 1, "", "engine", 8, 8, 1, 1, arrival="poisson")


def test_unknown_axis_values_list_what_exists(tmp_path: Path) -> None:
    cases = [({"kernel": ["tensorrt"]}, "unknown kernel 'tensorrt'; available: auto, reference, cpu, triton"),
             ({"compression": ["awq-4bit"]}, "unknown compression 'awq-4bit'; available: none, int8"),
             ({"offload": ["lru"]}, "unknown offload 'lru'; expected none or POLICY:CACHE"),
             ({"offload": ["fifo:8"]}, "POLICY in .*lru"),
             ({"routing": ["top-q:0.5"]}, "unknown routing mode 'top-q:0.5'"),
             ({"dtype": ["int4"]}, "unknown dtype 'int4'"),
             ({"workload": ["chatt"]}, "unknown workload 'chatt'"),
             ({"rate": [0]}, "rate must be null or a number > 0"),
             ({"colour": ["red"]}, "unknown axes \\['colour'\\]")]
    for axes, msg in cases:
        f = tmp_path / "s.yaml"
        f.write_text(f"axes: {{workload: [chat], {', '.join(f'{k}: {v}' for k, v in axes.items())}}}\n"
                     .replace("'", ""))
        with pytest.raises(ValueError, match=msg) as e:
            load_sweep(f)
        assert str(f) in str(e.value)
    (tmp_path / "t.yaml").write_text("axes: {workload: [chat]}\nbogus_field: 1\n")
    with pytest.raises(ValueError, match="unknown fields \\['bogus_field'\\]"):
        load_sweep(tmp_path / "t.yaml")
    with pytest.raises(FileNotFoundError, match="neither a file nor a shipped suite"):
        load_sweep(tmp_path / "missing.yaml")


def test_product_groups_points_by_model_and_list_mode() -> None:
    cfg = SweepConfig(models=["a"], axes={"workload": ["chat", "server"], "routing": ["default", "top-k:1"]})
    pts = cfg.expand()
    assert [(p.routing, p.workload) for p in pts] == [("default", "chat"), ("default", "server"),
                                                     ("top-k:1", "chat"), ("top-k:1", "server")]
    assert pts[0].id == "a/chat/reference/none/default/none/ckpt-dtype/b-default"
    listed = SweepConfig(models=["a"], axes={"workload": ["chat"]}, mode="list",
                         points=[{"workload": "server", "routing": "top-k:1"}, {"batch_size": 4}]).expand()
    assert listed[0] == Point(model="a", workload="server", routing="top-k:1")
    assert listed[1] == Point(model="a", workload="chat", batch_size=4)
    assert load_sweep("default").name == "default"
    rated = SweepConfig(models=["a"], axes={"workload": ["chat", "server"], "rate": [1, 4]}).expand()
    assert [(p.workload, p.rate) for p in rated] == [("chat", None), ("server", 1), ("server", 4)]
    assert rated[2].id.endswith("/r4")
    w = resolve(get_workload("server"), device_type="cpu", context=256, rate=4)
    assert w.rate == 4 and any("rate axis" in n for n in w.notes)


def test_list_shows_workloads_and_axes(capsys) -> None:
    from moeinfer.cli import main

    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert "decode-b1" in out and "suites: compare, default" in out
    assert "kernel       auto, reference, cpu, triton" in out and "int4" in out and "lru" in out


def test_top_k_routing_axis_sets_the_router(tmp_path: Path) -> None:
    import torch
    from hf_peers import save_hf_checkpoint

    import moeinfer
    from moeinfer.bench.config import apply_axes

    save_hf_checkpoint("mixtral", tmp_path / "m")
    model = moeinfer.load(tmp_path / "m", dtype=torch.float32, progress=False)
    apply_axes(model, Point(model="m", workload="chat", routing="top-k:1"))
    assert all(b.gate.top_k == 1 for b in model.moe_blocks())
    with pytest.raises(ValueError, match="layer 0 has only 8 experts"):
        apply_axes(model, Point(model="m", workload="chat", routing="top-k:9"))

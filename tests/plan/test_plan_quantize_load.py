"""Quantizing while loading (`load_planned` with a quantized plan on a CPU, moeinfer.planning.quantize_load):
the model equals `load` + `apply_plan_`'s (codes, scales, zeros, float layers and compression record
torch.equal; logits torch.equal), expert tensors are never read whole, and at most one layer of float
experts is in memory at a time. Plans that do not fit the model, or the memory, are refused clearly."""

from __future__ import annotations

import filecmp
import gc
import shutil
import weakref
from dataclasses import replace

import pytest
import torch
from offload_helpers import generate_with_logits

import moeinfer
import moeinfer.planning.quantize_load as qload
from moeinfer.loading.safetensors_io import SafetensorsFile
from moeinfer.models import resolve_model_path
from moeinfer.planning import Plan, PlanError, PlanOffload, apply_plan_, load_planned

PROMPT = [5, 9, 14, 3, 22, 7]
NEW = 4
LAYERS = 4  # the shipped tiny model's MoE layers


def _plan(precisions: tuple[str, ...], offload: PlanOffload | None = None) -> Plan:
    return Plan(model="tiny", device="cpu", budget_bytes=10**9, objective="latency", precisions=precisions,
                offload=offload)


UNIFORM = _plan(("int4",) * LAYERS)
MIXED = _plan(("int8", "bf16", "int4", "q4_0"))
OFFLOADED = _plan(("int4",) * LAYERS, PlanOffload(tier="disk", cache_experts=6, policy="lru"))


def _fused_copy(dst) -> str:
    """The tiny model saved with one fused [E, 2I, D] / [E, D, I] tensor per layer (transformers v5 names)."""
    from safetensors.torch import save_file

    whole = moeinfer.load("tiny", progress=False)
    tensors = {("" if k.startswith("lm_head") else "model.") + k: v.contiguous() for k, v in whole.state_dict().items()}
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(resolve_model_path("tiny") / name, dst / name)
    return str(dst)


def _assert_same_model(got, want) -> None:
    sg, sw = got.state_dict(), want.state_dict()
    assert sorted(sg) == sorted(sw)
    for k in sw:  # codes (uint8), scales and zeros (fp32), float experts and dense weights
        assert sg[k].dtype == sw[k].dtype and torch.equal(sg[k], sw[k]), k
    assert got.config.hf_config["moeinfer_compression"] == want.config.hf_config["moeinfer_compression"]
    assert [type(b.experts) for b in got.moe_blocks()] == [type(b.experts) for b in want.moe_blocks()]
    assert [b.experts.kernel for b in got.moe_blocks()] == [b.experts.kernel for b in want.moe_blocks()]
    assert got.plan == want.plan and not hasattr(got, "expert_files")


@pytest.mark.parametrize("case", [
    pytest.param((UNIFORM, None, False), id="int4"),
    pytest.param((UNIFORM, torch.float32, False), id="int4-fp32"),  # experts converted on read, as the loader does
    pytest.param((UNIFORM, None, True), id="int4-fused-checkpoint"),
    pytest.param((MIXED, None, False), id="mixed"),
])
def test_quantizing_while_loading_equals_load_then_apply_plan(case, tmp_path, monkeypatch):
    plan, dtype, fused = case
    path = _fused_copy(tmp_path / "fused") if fused else "tiny"
    want = apply_plan_(moeinfer.load(path, dtype=dtype, progress=False), plan)
    read: list[str] = []
    real = SafetensorsFile.read_into
    monkeypatch.setattr(SafetensorsFile, "read_into",
                        lambda self, name, *a, **k: (read.append(name), real(self, name, *a, **k))[1])
    got = load_planned(path, plan, dtype=dtype, progress=False)
    assert read and not any(".experts." in n for n in read)  # expert tensors never read whole
    _assert_same_model(got, want)
    _, logits_want = generate_with_logits(want, PROMPT, NEW)
    _, logits_got = generate_with_logits(got, PROMPT, NEW)
    assert torch.equal(logits_got, logits_want)


def test_quantized_offloaded_plan_writes_the_same_store_and_runs_the_same(tmp_path):
    want = apply_plan_(moeinfer.load("tiny", progress=False), OFFLOADED, offload_dir=tmp_path / "want")
    got = load_planned("tiny", OFFLOADED, offload_dir=tmp_path / "got", progress=False)
    try:
        files = sorted(p.name for p in (tmp_path / "want").iterdir())
        assert files and files == sorted(p.name for p in (tmp_path / "got").iterdir())
        _, mismatch, errors = filecmp.cmpfiles(tmp_path / "want", tmp_path / "got", files, shallow=False)
        assert not mismatch and not errors  # the quantized experts' codes, byte for byte
        assert got.config.hf_config["moeinfer_compression"] == want.config.hf_config["moeinfer_compression"]
        assert [b.experts.kernel for b in got.moe_blocks()] == [b.experts.kernel for b in want.moe_blocks()]
        assert got.offload.cache.num_slots == want.offload.cache.num_slots == 6
        _, logits_want = generate_with_logits(want, PROMPT, NEW)
        _, logits_got = generate_with_logits(got, PROMPT, NEW)
        assert torch.equal(logits_got, logits_want)
    finally:
        want.offload.close()
        got.offload.close()


def test_a_planned_model_saved_once_is_not_quantized_again(tmp_path, monkeypatch):
    """A model quantized while loading, saved with moeinfer.save, loads back under the same plan (by
    load + apply_plan_, or by load_planned) with its quantized experts as they are: no layer quantized
    a second time, the same tensors and the same logits."""
    from moeinfer.formats.quantized_experts import QuantizedExperts

    got = load_planned("tiny", MIXED, progress=False)
    moeinfer.save(got, tmp_path / "planned")
    quantized = []
    real = QuantizedExperts.from_float
    monkeypatch.setattr(QuantizedExperts, "from_float",
                        classmethod(lambda cls, *a, **k: (quantized.append(1), real(*a, **k))[1]))
    _, logits_got = generate_with_logits(got, PROMPT, NEW)
    for back in (apply_plan_(moeinfer.load(tmp_path / "planned", progress=False), MIXED),
                 load_planned(tmp_path / "planned", MIXED, progress=False)):
        assert not quantized
        sg, sb = got.state_dict(), back.state_dict()
        assert sorted(sg) == sorted(sb) and all(torch.equal(sg[k], sb[k]) for k in sg)
        assert [b.experts.kernel for b in back.moe_blocks()] == [b.experts.kernel for b in got.moe_blocks()]
        _, logits_back = generate_with_logits(back, PROMPT, NEW)
        assert torch.equal(logits_back, logits_got)


def test_a_layer_quantized_otherwise_than_the_plan_is_refused(tmp_path):
    from moeinfer.compress.registry import CompressionError

    moeinfer.save(load_planned("tiny", UNIFORM, progress=False), tmp_path / "int4")
    with pytest.raises(CompressionError, match="layer 0 holds QuantizedExperts"):
        apply_plan_(moeinfer.load(tmp_path / "int4", progress=False), _plan(("int8",) * LAYERS))


@pytest.mark.parametrize("plan", [UNIFORM, MIXED], ids=["int4", "mixed"])
def test_one_layer_of_float_experts_at_a_time(plan, monkeypatch):
    """Each layer's float experts are read once (every expert exactly once) and freed before the next
    layer is read; only a mixed plan's float layers stay."""
    real = qload.read_layer_experts
    layers: list[tuple[int, list[weakref.ref]]] = []
    reads: list[int] = []

    def spy(store, position):
        gc.collect()
        for pos, refs in layers:
            alive = [r() is not None for r in refs]
            kept = plan.precisions[pos] == "bf16"
            assert all(alive) if kept else not any(alive), f"layer {pos}'s float experts while reading {position}"
        ex = real(store, position)
        layers.append((position, [weakref.ref(ex.gate_up_proj), weakref.ref(ex.down_proj)]))
        reads.append(store.reads)
        return ex

    monkeypatch.setattr(qload, "read_layer_experts", spy)
    model = load_planned("tiny", plan, progress=False)
    E = model.config.num_experts
    assert [p for p, _ in layers] == list(range(LAYERS))
    assert reads == [E * (i + 1) for i in range(LAYERS)]  # one layer's experts per read, each once
    gc.collect()
    assert [any(r() is not None for r in refs) for _, refs in layers] == [p == "bf16" for p in plan.precisions]


def test_an_offloaded_plan_writes_each_quantized_layer_to_its_store_and_frees_it(tmp_path, monkeypatch):
    """An offloaded quantized plan holds one layer of quantized experts at a time: when layer k is read,
    layers 0..k-1 are in the expert store and their codes freed (meta)."""
    real_read, real_spill = qload.read_layer_experts, qload.spill_
    spilled: list = []  # the blocks written so far
    seen: list[tuple[int, list[bool], list[str]]] = []

    def read(store, position):
        freed = [all(t.is_meta for t in b.experts.parameters()) for b in spilled]
        seen.append((position, freed, sorted(p.name for p in (tmp_path / "store").glob("experts-*"))))
        return real_read(store, position)

    def spill(writer, position, block):
        real_spill(writer, position, block)
        spilled.append(block)

    monkeypatch.setattr(qload, "read_layer_experts", read)
    monkeypatch.setattr(qload, "spill_", spill)
    model = load_planned("tiny", OFFLOADED, offload_dir=tmp_path / "store", progress=False)
    try:
        assert [p for p, _, _ in seen] == list(range(LAYERS))
        for position, freed, files in seen:
            assert freed == [True] * position
            assert files == [f"experts-{i:03d}.safetensors" for i in range(position)]
        assert not hasattr(model, "expert_store_dir")
    finally:
        model.offload.close()


def test_a_failed_offloaded_load_deletes_the_layers_it_wrote_and_nothing_else(tmp_path, monkeypatch):
    real = qload.read_layer_experts

    def fail_at_two(store, position):
        if position == 2:
            raise OSError("disk read failed")
        return real(store, position)

    folder = tmp_path / "store"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    monkeypatch.setattr(qload, "read_layer_experts", fail_at_two)
    with pytest.raises(OSError, match="disk read failed"):
        load_planned("tiny", OFFLOADED, offload_dir=folder, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_experts_written_to_a_store_are_offloaded_from_that_store_only(tmp_path):
    from moeinfer.loading.checkpoint import load_checkpoint
    from moeinfer.offload import OffloadConfig, OffloadError, offload_
    from moeinfer.planning.apply import quantize_step

    model = load_checkpoint(resolve_model_path("tiny"), progress=False, experts_on_disk=True)
    qload.quantize_from_checkpoint_(model, quantize_step(OFFLOADED), store_dir=tmp_path / "store")
    with pytest.raises(OffloadError, match="were written to the expert store .*store: offload them to tier='disk' "
                                           "with offload_dir="):
        offload_(model, OffloadConfig(tier="disk", offload_dir=tmp_path / "elsewhere", cache=6))
    with pytest.raises(OffloadError, match="written to the expert store"):
        offload_(model, OffloadConfig(tier="cpu", cache=6))
    offload_(model, OffloadConfig(tier="disk", offload_dir=tmp_path / "store", cache=6))
    model.offload.close()


def test_a_plan_for_another_model_is_refused_before_reading_experts(monkeypatch):
    monkeypatch.setattr(qload, "read_layer_experts", lambda *a: pytest.fail("an expert layer was read"))
    with pytest.raises(PlanError, match="lists 3 MoE layers; this model has 4"):
        load_planned("tiny", _plan(("int4",) * 3), progress=False)


def test_a_bad_precision_is_refused_before_reading_experts(monkeypatch):
    monkeypatch.setattr(qload, "read_layer_experts", lambda *a: pytest.fail("an expert layer was read"))
    with pytest.raises(ValueError, match="layer precision 'int5' is not known"):
        load_planned("tiny", _plan(("int4", "int5", "int4", "int4")), progress=False)


@pytest.mark.parametrize("plan, held", [
    pytest.param(UNIFORM, "4 quantized layers, 0 bf16 layers kept", id="resident"),
    # an offloaded plan writes each quantized layer to its store once made: room for one
    pytest.param(OFFLOADED, "one quantized layer before it is written to the expert store", id="offloaded"),
])
def test_quantized_experts_that_do_not_fit_in_memory_are_refused_before_reading(monkeypatch, plan, held):
    monkeypatch.setattr(qload, "read_layer_experts", lambda *a: pytest.fail("an expert layer was read"))
    monkeypatch.setattr(qload, "memory_available", lambda device: 1000)
    with pytest.raises(PlanError, match=rf"quantizing .* while loading needs .* GB for its experts \({held}, one "
                                        r"bf16 layer being quantized\)"):
        load_planned("tiny", plan, progress=False)


# --- the planner: a model too big to measure gets quantized plans from a stand-in quality model ---

def _too_big_to_measure(monkeypatch) -> list:
    """plan() as for a checkpoint bigger than memory: the model is not loaded to measure (its own quality
    and routing); the stand-in source's quality is a known one (recorded calls)."""
    from plan_helpers import toy_quality

    import moeinfer.planning.planner as planner

    calls: list = []

    def source_quality(path, model, text, precisions, **kw):
        calls.append(path)
        return replace(toy_quality(4), fit={"int8": 2.002, "int4": 2.01})  # 0.1% and 0.5% more bits per byte

    monkeypatch.setattr(planner, "_load_for_measurement", lambda path, sizes: None)
    monkeypatch.setattr(planner, "cached_quality", source_quality)
    return calls


def _int4_budget() -> int:
    from moeinfer.planning.costs import expert_bytes, fixed_bytes
    from moeinfer.planning.sizes import sizes_from_checkpoint

    s = sizes_from_checkpoint("tiny")
    return fixed_bytes(s, batch=1, context=256) + s.num_layers * s.num_experts * expert_bytes(s, "int4") + 4096


def test_a_model_too_big_to_measure_gets_quantized_plans_from_a_stand_in(monkeypatch):
    from plan_helpers import synthetic_profile

    from moeinfer.planning.planner import plan

    calls = _too_big_to_measure(monkeypatch)
    budget = _int4_budget()  # uniform int4 resident fits; every float expert does not
    alone = plan("tiny", budget, profile=synthetic_profile(), context=256)
    assert set(alone.precisions) == {"bf16"} and alone.offload is not None and not calls
    assert any("only bf16 experts considered" in n for n in alone.notes)
    stood = plan("tiny", budget, profile=synthetic_profile(), context=256, quality_from="tiny")
    assert calls == ["tiny"]
    assert stood.precisions == ("int4",) * LAYERS and stood.offload is None  # priced at its quantized size
    assert stood.predicted.memory_bytes <= budget
    assert stood.predicted.quality_loss == pytest.approx(0.005)
    assert any("stand-in: tiny's measured loss" in n and "int4 +0.50%" in n for n in stood.notes)
    # the bound acts on the stand-in's loss: int4 (0.5%) is over 0.2%, int8 (0.1%) within it
    strict = plan("tiny", budget, profile=synthetic_profile(), context=256, quality_from="tiny", max_quality_loss=0.002)
    assert "int4" not in strict.precisions and "int8" in strict.precisions


def test_stand_in_quality_charges_the_sources_loss_per_precision():
    from moeinfer.planning.quality import QualityModel, stand_in_quality

    source = QualityModel(base_bpb=2.0, alpha=0.1, errors={"bf16": [0.0] * 4, "int8": [0.01] * 4, "int4": [0.1] * 4},
                          fit={"int8": 2.002, "int4": 2.03}, source="english")
    q = stand_in_quality(2, source, name="the shipped model")
    assert q.loss(["bf16", "bf16"]) == 0.0
    assert q.loss(["int8", "int8"]) == pytest.approx(0.001) and q.loss(["int4", "int4"]) == pytest.approx(0.015)
    assert q.loss(["int4", "bf16"]) == pytest.approx(0.0075)  # losses add over layers, as the planner assumes
    assert "the shipped model" in q.source and "english" in q.source


def test_only_checkpoints_with_stored_expert_kinds_load_whole(tmp_path):
    """load_planned streams a checkpoint whose experts are plain (a pruned one's layout too) and loads
    whole one whose experts are stored quantized (`stored_experts`, from config.json alone)."""
    import json

    from moeinfer.formats.layout import RECORD_KEY
    from moeinfer.planning.load import stored_experts

    tiny = resolve_model_path("tiny")
    assert not stored_experts(tiny)
    config = json.loads((tiny / "config.json").read_text())
    for name, kinds in (("plain", ["experts"] * LAYERS), ("mixed", ["experts", "quantized", "experts", "experts"])):
        layout = {str(i): {"num_experts": 6, "kind": k, "params": {}} for i, k in enumerate(kinds)}
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({**config, RECORD_KEY: {"version": 1, "steps": [],
                                                                                        "layout": layout}}))
    assert not stored_experts(tmp_path / "plain")
    assert stored_experts(tmp_path / "mixed")
    moeinfer.save(load_planned("tiny", UNIFORM, progress=False), tmp_path / "q")
    assert stored_experts(tmp_path / "q")

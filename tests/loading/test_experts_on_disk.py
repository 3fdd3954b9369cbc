"""Loading with the experts left on disk (models bigger than memory): `moeinfer.load(path, offload=...)`
reads the dense weights only and runs the offloaded experts straight from the checkpoint's files
(CheckpointStore); its logits equal load-then-`offload_` (torch.equal). Memory is checked structurally:
expert parameters are never given storage and expert tensors are read only when the cache loads them.
A checkpoint too big for the free memory is refused with a clear error before anything is allocated."""

from __future__ import annotations

import pytest
import torch
from offload_helpers import generate_with_logits

import moeinfer
import moeinfer.loading.checkpoint as ckpt
from moeinfer.loading.errors import CheckpointError
from moeinfer.loading.safetensors_io import SafetensorsFile
from moeinfer.models import resolve_model_path
from moeinfer.offload import OffloadConfig, offload_
from moeinfer.offload.checkpoint_store import CheckpointStore
from moeinfer.planning import Plan, PlanOffload, load_planned

PROMPT = [5, 9, 14, 3, 22, 7]
NEW = 8


def _cfg(tmp_path, **kw) -> OffloadConfig:
    return OffloadConfig(tier="disk", offload_dir=tmp_path / "store", cache=3, scope="layer", policy="lru", **kw)


@pytest.mark.parametrize("dtype", [None, torch.float32])  # as stored (read in place), converted on read
def test_streamed_load_equals_load_then_offload(tmp_path, dtype):
    ref = moeinfer.load("tiny", dtype=dtype, progress=False)
    offload_(ref, _cfg(tmp_path))
    _, want = generate_with_logits(ref, PROMPT, NEW)
    ref.offload.close()
    model = moeinfer.load("tiny", dtype=dtype, progress=False, offload=_cfg(tmp_path / "unused"))
    try:
        assert isinstance(model.offload.store, CheckpointStore)
        assert not (tmp_path / "unused").exists()  # the checkpoint is the disk tier: nothing written
        _, got = generate_with_logits(model, PROMPT, NEW)
        assert torch.equal(got, want)
    finally:
        model.offload.close()


def test_experts_are_never_allocated_nor_read_at_load(monkeypatch):
    read: list[str] = []
    real = SafetensorsFile.read_into
    monkeypatch.setattr(SafetensorsFile, "read_into",
                        lambda self, name, *a, **k: (read.append(name), real(self, name, *a, **k))[1])
    model = ckpt.load_checkpoint(resolve_model_path("tiny"), progress=False, experts_on_disk=True)
    blocks = model.moe_blocks()
    assert all(p.is_meta for b in blocks for p in b.experts.parameters())  # no storage at all
    assert not any(".experts." in n for n in read) and read  # dense tensors read, expert tensors not
    files = model.expert_files
    assert (files.num_layers, files.num_experts) == (len(blocks), blocks[0].experts.num_experts)
    # allocated = every parameter but the experts
    whole = moeinfer.load("tiny", progress=False)
    expert_bytes = sum(p.numel() * p.element_size() for b in whole.moe_blocks() for p in b.experts.parameters())
    allocated = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    assert allocated == sum(p.numel() * p.element_size() for p in whole.parameters()) - expert_bytes
    assert files.expert_bytes * files.num_layers * files.num_experts == expert_bytes


def test_experts_are_read_only_when_the_cache_loads_them(tmp_path):
    model = moeinfer.load("tiny", progress=False, offload=_cfg(tmp_path))
    try:
        store = model.offload.store
        assert store.reads == 0  # nothing read at load (lru: no warm-up)
        generate_with_logits(model, PROMPT, NEW)
        st = model.offload.cache.stats
        assert store.reads == st.demand_loads + st.prefetch_loads + st.warm_loads > 0
        assert store.bytes_read == store.reads * store.expert_bytes
    finally:
        model.offload.close()


def test_fused_expert_checkpoints_stream_too(tmp_path):
    """A checkpoint with one fused [E, 2I, D] / [E, D, I] tensor per layer (transformers v5 names): each
    expert is one row of each, read at its own offset."""
    import shutil

    from safetensors.torch import save_file

    src = resolve_model_path("tiny")
    whole = moeinfer.load("tiny", progress=False)
    tensors = {("" if k.startswith("lm_head") else "model.") + k: v.contiguous()
               for k, v in whole.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in tensors)
    (tmp_path / "fused").mkdir()
    save_file(tensors, str(tmp_path / "fused" / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / name, tmp_path / "fused" / name)
    _, want = generate_with_logits(whole, PROMPT, NEW)  # resident: the offloaded run is exact
    model = moeinfer.load(tmp_path / "fused", progress=False, offload=_cfg(tmp_path))
    try:
        assert {p.part for ps in model.expert_files.parts.values() for p in ps} == {"gate_up", "down"}
        _, got = generate_with_logits(model, PROMPT, NEW)
        assert torch.equal(got, want)
    finally:
        model.offload.close()


def test_a_checkpoint_bigger_than_free_memory_is_refused_before_allocating(monkeypatch, tmp_path):
    whole = moeinfer.load("tiny", progress=False)
    total = sum(p.numel() * p.element_size() for p in whole.parameters())
    experts = sum(p.numel() * p.element_size() for b in whole.moe_blocks() for p in b.experts.parameters())
    monkeypatch.setattr(ckpt, "memory_available", lambda device: total - experts // 2)  # dense fits, all doesn't
    with pytest.raises(CheckpointError, match=r"needs .* GB of memory for its weights, but only .* GB is available"):
        moeinfer.load("tiny", progress=False)
    assert len(moeinfer.load("tiny", progress=False, check_memory=False).layers) == len(whole.layers)  # opted out
    # the same checkpoint loads with its experts left on disk, under a plan that offloads them
    plan = Plan(model="tiny", device="cpu", budget_bytes=total, objective="latency", precisions=("bf16",) * 4,
                offload=PlanOffload(tier="disk", cache_experts=6, policy="lru"))
    plan.save(tmp_path / "plan.yaml")
    model = load_planned("tiny", tmp_path / "plan.yaml", progress=False)
    try:
        assert isinstance(model.offload.store, CheckpointStore) and model.plan == plan
        assert model.offload.cache.num_slots == 6
        assert len(moeinfer.generate(model, [PROMPT], max_new_tokens=3, ignore_eos=True)[0].token_ids) == 3
    finally:
        model.offload.close()


def test_streamed_load_refuses_what_it_cannot_stream(tmp_path):
    with pytest.raises(ValueError, match="experts_on_disk cannot be combined"):
        ckpt.load_checkpoint(resolve_model_path("tiny"), progress=False, experts_on_disk=True, on_expert_error="mask")
    model = ckpt.load_checkpoint(resolve_model_path("tiny"), progress=False, experts_on_disk=True)
    from moeinfer.offload import OffloadError

    with pytest.raises(OffloadError, match="tier='disk'"):
        offload_(model, OffloadConfig(tier="cpu", cache=4))
    del model.expert_files
    with pytest.raises(OffloadError, match="records no checkpoint files"):
        offload_(model, _cfg(tmp_path))


def test_cli_generate_with_an_offloading_plan_streams_the_experts(tmp_path, monkeypatch, capsys):
    from moeinfer.cli import main

    plan = Plan(model="tiny", device="cpu", budget_bytes=10**8, objective="latency", precisions=("bf16",) * 4,
                offload=PlanOffload(tier="disk", cache_experts=4, policy="lfu"))
    plan.save(tmp_path / "plan.yaml")
    seen = {}
    real = CheckpointStore.__init__

    def spy(self, *a, **k):
        real(self, *a, **k)
        seen["store"] = self

    monkeypatch.setattr(CheckpointStore, "__init__", spy)
    rc = main(["generate", "--model", "tiny", "--plan", str(tmp_path / "plan.yaml"), "--max-new-tokens", "4",
               "Once upon a time"])
    assert rc == 0 and seen["store"].reads > 0
    assert capsys.readouterr().out.strip()


def test_converting_reads_work_under_inference_mode(tmp_path):
    """`moeinfer eval` runs in inference mode with fp32 weights: slots are inference tensors that the
    loader's thread (outside inference mode) fills with converted bf16 experts."""
    ref = moeinfer.load("tiny", dtype=torch.float32, progress=False)
    model = moeinfer.load("tiny", dtype=torch.float32, progress=False, offload=_cfg(tmp_path))
    try:
        ids = torch.tensor([PROMPT])
        with torch.inference_mode():
            got, want = model(ids), ref(ids)
        assert torch.equal(got, want)
    finally:
        model.offload.close()

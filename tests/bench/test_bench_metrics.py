"""moeinfer.bench metric formulas on synthetic data with hand-computed answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moeinfer.bench.metrics import (
    ForwardRecord,
    compute_peak,
    expert_load,
    forward_cost,
    kv_cache_bytes,
    peak_rss_bytes,
    sparse_utilization,
    weight_stats,
)
from moeinfer.model.shape import ModelShape

# embed_row_bytes = hidden * dtype_bytes = 10
SHAPE = ModelShape("by-hand", num_layers=2, num_experts=4, top_k=2, hidden=5, inter=3, dtype_bytes=2,
                   dense_read_bytes=1000, vocab_size=100, stored_expert_bytes=200, stored_expert_params=50,
                   dense_matmul_params=100, kv_slot_bytes=4, attn_flops_per_key=8)
DECODE = [ForwardRecord(0.5, rows=2, tokens=1, kv_end=10, distinct=(3, 2), slots=(4, 4)),
          ForwardRecord(0.5, rows=2, tokens=1, kv_end=11, distinct=(2, 2), slots=(4, 4))]
PREFILL = ForwardRecord(2.0, rows=1, tokens=8, kv_end=8, distinct=(4, 3), slots=(16, 16))


def test_forward_cost_by_hand() -> None:
    # bytes = W_dense + N*row + sum(d_l)*W_expert + B*S*kv_slot = 1000 + 2*10 + 5*200 + 2*10*4
    # flops = 2*N*P_dense + sum_l 2*slots_l*P_expert + N*S*attn = 400 + 2*(2*4*50) + 2*10*8
    assert forward_cost(DECODE[0], SHAPE) == (2100, 1360)
    assert forward_cost(DECODE[1], SHAPE) == (1908, 1376)
    # prefill: 1000 + 8*10 + 7*200 + 1*8*4 ; 2*8*100 + 2*(2*16*50) + 8*8*8
    assert forward_cost(PREFILL, SHAPE) == (2512, 5312)


def test_s_mbu_s_mfu_by_hand() -> None:
    u = sparse_utilization([*DECODE, PREFILL], SHAPE, bandwidth=8016.0, flops_peak=27360.0)
    d, p = u["decode"], u["prefill"]
    assert d["forwards"] == 2 and d["seconds"] == pytest.approx(1.0)
    assert d["bytes"] == 4008 and d["flops"] == 2736
    assert d["s_mbu"] == pytest.approx(0.5)  # 4008 B / 1 s / 8016 B/s
    assert d["s_mfu"] == pytest.approx(0.1)  # 2736 FLOP / 1 s / 27360 FLOP/s
    assert p["bytes_per_s"] == pytest.approx(1256.0) and p["flops_per_s"] == pytest.approx(2656.0)
    none = sparse_utilization(DECODE, SHAPE, bandwidth=None, flops_peak=None)
    assert none["decode"]["s_mbu"] is None and none["prefill"]["seconds"] == 0 and none["prefill"]["s_mfu"] is None


def test_compute_peak_is_the_faster_of_the_dtype_and_fp32() -> None:
    """A CPU without native bf16 matmul runs bf16 experts in fp32: measured against the bf16 rate alone,
    S-MFU read 231%. The peak is the fastest rate the machine offers for the work."""
    cpu = {"bfloat16": 0.4e12, "float32": 1.5e12}
    assert compute_peak(cpu, "bfloat16") == 1.5e12
    gpu = {"bfloat16": 989e12, "float32": 67e12}
    assert compute_peak(gpu, "bfloat16") == 989e12 and compute_peak(gpu, "float32") == 67e12
    assert compute_peak({}, "bfloat16") is None
    # the work a widened kernel did at the fp32 rate stays under 100%
    u = sparse_utilization([PREFILL], SHAPE, bandwidth=None, flops_peak=compute_peak({"bfloat16": 2000.0,
                                                                                      "float32": 2656.0}, "bfloat16"))
    assert u["prefill"]["s_mfu"] == pytest.approx(1.0)


def test_expert_load_distinct_and_imbalance() -> None:
    counts = np.array([[4, 0, 0, 0], [1, 1, 1, 1]])  # layer 0: one expert takes all; layer 1: balanced
    out = expert_load([*DECODE, PREFILL], counts)
    assert out["distinct_per_layer_decode"] == [2.5, 2.0]  # decode forwards only
    assert out["distinct_mean_decode"] == pytest.approx(2.25)
    assert out["imbalance_per_layer"] == [4.0, 1.0]  # max / mean
    assert out["imbalance_max"] == 4.0 and out["imbalance_mean"] == 2.5
    assert expert_load([], None)["imbalance_mean"] is None


def test_forward_record_round_trip() -> None:
    f = DECODE[0]
    assert ForwardRecord.from_list(f.to_list()) == f
    assert f.phase == "decode" and PREFILL.phase == "prefill"


def test_peak_rss_from_a_status_file(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t 999 kB\nVmHWM:\t   2048 kB\nVmRSS:\t 1000 kB\n")
    assert peak_rss_bytes(status) == 2048 * 1024
    assert peak_rss_bytes(tmp_path / "missing") is None
    assert peak_rss_bytes("/proc/self/status") is None or peak_rss_bytes() > 0


def test_model_shape_matches_the_weights(tmp_path: Path) -> None:
    """A forward that activates every expert reads every weight except the unread embedding rows."""
    from hf_peers import save_hf_checkpoint

    import moeinfer

    save_hf_checkpoint("mixtral", tmp_path / "m")
    model = moeinfer.load(tmp_path / "m", dtype=torch.float32, progress=False)
    shape = ModelShape.from_model(model)
    cfg = model.config
    assert shape.expert_params == 3 * cfg.moe_intermediate_size * cfg.hidden_size
    assert shape.kv_slot_bytes == cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4
    E, L = cfg.num_experts, len(model.moe_blocks())
    f = ForwardRecord(1.0, rows=1, tokens=1, kv_end=0, distinct=(E,) * L, slots=(cfg.top_k,) * L)
    w = weight_stats(model)
    embed = model.embed_tokens.weight
    assert forward_cost(f, shape)[0] == w["weight_bytes"] - embed.numel() * 4 + embed.shape[1] * 4
    assert w["bits_per_param"] == pytest.approx(32.0)
    assert kv_cache_bytes(shape, 3, 10) == 30 * shape.kv_slot_bytes


def test_instrument_agrees_with_routing_traces_and_changes_nothing(tmp_path: Path) -> None:
    """The per-forward hooks see the same expert load as moeinfer.traces.trace, and leave outputs alone."""
    from hf_peers import save_hf_checkpoint

    import moeinfer
    from moeinfer.bench.instrument import instrument
    from moeinfer.engine.generate import generate
    from moeinfer.traces.trace import record_routing
    from moeinfer.traces.stats import summarize

    save_hf_checkpoint("mixtral", tmp_path / "m")
    model = moeinfer.load(tmp_path / "m", dtype=torch.float32, progress=False)
    prompts = [[3, 5, 7, 9, 11, 13], [2, 4, 6, 8, 10, 12]]  # equal lengths: no padding rows
    plain = generate(model, prompts, max_new_tokens=5, ignore_eos=True)
    with instrument(model) as ins, record_routing(model, logits=False) as rec:
        timed = generate(model, prompts, max_new_tokens=5, ignore_eos=True)
    assert [g.token_ids for g in timed] == [g.token_ids for g in plain]
    stats = summarize(rec.trace())
    assert ins.counts.tolist() == stats["tokens_per_expert"]
    assert expert_load(ins.forwards, ins.counts)["imbalance_mean"] == pytest.approx(stats["imbalance_mean"])
    assert [(f.rows, f.tokens, f.kv_end) for f in ins.forwards] == [(2, 6, 6)] + [(2, 1, 6 + i) for i in range(1, 5)]
    assert all(len(f.distinct) == len(model.moe_blocks()) for f in ins.forwards)
    assert all(f.slots[0] == f.rows * f.tokens * model.config.top_k for f in ins.forwards)


def test_instrument_counts_only_the_slots_dynamic_gating_uses(tmp_path: Path) -> None:
    from hf_peers import save_hf_checkpoint

    import moeinfer
    from moeinfer.bench.instrument import instrument
    from moeinfer.engine.generate import generate

    save_hf_checkpoint("mixtral", tmp_path / "m")
    model = moeinfer.load(tmp_path / "m", dtype=torch.float32, progress=False)
    moeinfer.set_routing_(model, "top-p:0.01")  # per-token k: every token keeps 1 of its top_k=2 slots
    with instrument(model) as ins:
        generate(model, [[3, 5, 7, 9]], max_new_tokens=3, ignore_eos=True)
    assert all(f.slots[0] == f.rows * f.tokens for f in ins.forwards)
    assert int(ins.counts[0].sum()) == 4 + 2  # prompt tokens + decode steps that ran the model

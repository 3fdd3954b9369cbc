"""The prepared one-row CPU decode (moeinfer/engine/cpu_decode.py) against the eager forward: decode steps
from the same prefilled cache give the same logits bit for bit (torch.equal), for every architecture and
dtype, native or eager modules, quantized experts and linears (one width, two widths), offloaded experts,
routing transforms, observers, hooks, sliding windows and padding; and generate uses it."""

from __future__ import annotations

import contextlib

import pytest
import torch

from compress_quant_helpers import ARCHS, build_random
from decode_helpers import left_padded_prefill
from native_helpers import native_ops

import moeinfer
from moeinfer.engine import cpu_decode
from moeinfer.engine.cpu_decode import CpuDecoder, cpu_decode_blocker, prepared_cpu_decode
from moeinfer.formats.quantized_experts import QuantizedExperts
from moeinfer.kernels import use_kernel_

PROMPT = [5, 17, 29, 3, 50, 8, 41]


@torch.no_grad()
def steps(model, prepared: bool, n: int = 5, prompt=PROMPT, inactive_at: int | None = None) -> tuple[list, int]:
    """Logits of the prefill and `n` greedy decode steps through the model's forward, with the program
    `prepared` or not, and how many steps the program ran; the row is marked finished (its tokens
    padding) from step `inactive_at` on."""
    cache, logits = left_padded_prefill(model, [prompt], n)
    out = [logits]
    with prepared_cpu_decode(model, cache) if prepared else contextlib.nullcontext() as program:
        for i in range(n):
            active = torch.tensor([[inactive_at is None or i < inactive_at]])
            out.append(model(out[-1].argmax(-1)[:, None], attention_mask=active, cache=cache)[:, -1])
    assert model.decode_program is None  # the seam restored
    return out, program.steps if program is not None else 0


def assert_same(model, *, ran: int | None = None, **kw) -> None:
    """Same logits with the program as without; the program ran `ran` steps (default: every one)."""
    (want, _), (got, count) = steps(model, False, **kw), steps(model, True, **kw)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"step {i}: max |diff| {float((a.float() - b.float()).abs().max())}"
    assert count == (len(want) - 1 if ran is None else ran)


def prepared(model) -> tuple[int, int]:
    """(prepared attentions, prepared expert stages) of a CpuDecoder over `model`."""
    cache, _ = left_padded_prefill(model, [PROMPT], 2)
    layers = CpuDecoder(model, cache).layers
    return (sum(isinstance(l.attn, cpu_decode._Attention) for l in layers),
            sum(isinstance(l.ffn, cpu_decode._MoE) and l.ffn.prepared for l in layers))


@pytest.fixture(scope="module")
def models():
    return {arch: build_random(arch) for arch in ARCHS}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_native_model_same_logits_as_eager(models, arch, dtype):
    native_ops()
    model = build_random(arch).to(dtype)
    use_kernel_(model, "auto", linears=True)
    assert_same(model)
    attns, _ = prepared(model)
    assert attns == (0 if model.config.attention == "mla" else model.config.num_layers)


@pytest.mark.parametrize("arch", ["olmoe", "qwen2_moe"])
def test_eager_modules_same_logits(arch):
    model = build_random(arch).to(torch.bfloat16)
    assert_same(model)
    assert prepared(model) == (0, 0)  # nothing native: every part called as its module


# every matrix's columns a multiple of 32: the int8-activation kernels of the Q8_0/Q4_0 formats run
WHOLE_BLOCKS = dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=32, head_dim=16,
                    shared_expert_intermediate_size=32)


@pytest.mark.parametrize("preset", ["q8_0-all", "q4_0-all", "int4", "int8-all"])
@pytest.mark.parametrize("arch", ["olmoe", "qwen3_moe", "qwen2_moe"])
def test_quantized_models_same_logits(arch, preset):
    native_ops()
    model = build_random(arch, **WHOLE_BLOCKS).to(torch.bfloat16)
    moeinfer.compress_(model, preset, progress=False)
    use_kernel_(model, "auto", linears=True)
    assert_same(model)
    assert prepared(model) == (model.config.num_layers, len(model.moe_blocks()))


def test_two_bit_widths_run_the_module_and_match():
    native_ops()
    model = build_random("olmoe", **WHOLE_BLOCKS).to(torch.bfloat16)
    for block in model.moe_blocks():
        gu, dn = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()
        E = gu.shape[0]
        block.experts = QuantizedExperts.from_float(gu, dn, [8, 4] * (E // 2), group_size=32)
    use_kernel_(model, "auto", linears=True)
    assert_same(model)
    assert prepared(model)[1] == 0


def test_offloaded_experts_same_logits(tmp_path):
    native_ops()
    from moeinfer.offload import OffloadConfig, offload_

    model = build_random("qwen3_moe", **WHOLE_BLOCKS).to(torch.bfloat16)
    moeinfer.compress_(model, "q8_0", progress=False)
    offload_(model, OffloadConfig(tier="cpu", cache=3))
    use_kernel_(model, "auto", linears=True)
    assert_same(model)


def test_transforms_observers_and_hooks_same_logits():
    native_ops()
    model = build_random("mixtral").to(torch.bfloat16)
    use_kernel_(model, "auto", linears=True)
    model.moe_blocks()[0].gate.mask_expert(1)
    moeinfer.compress_(model, [{"method": "gating", "mode": "top-k:1"}], progress=False)
    seen = {"eager": [], "program": []}
    key = ["eager"]
    model.add_routing_observer(lambda i, r: seen[key[0]].append((i, r.indices.clone())))
    model.add_token_observer(lambda v, p, new: seen[key[0]].append(("token", p.clone(), new)))
    hooked, forwards = [], []
    model.layers[1].self_attn.register_forward_hook(lambda m, a, out: hooked.append(out.clone()))
    model.register_forward_hook(lambda m, a, out: forwards.append(out.shape))  # the model's own hooks run
    want, _ = steps(model, False)
    key[0] = "program"
    got, ran = steps(model, True)
    assert ran == len(want) - 1 and len(forwards) == 2 * len(want)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert len(seen["program"]) == len(seen["eager"]) > 0
    assert all(str(a) == str(b) for a, b in zip(seen["program"], seen["eager"]))
    assert len(hooked) == 2 * len(want)  # the hooked attention is called as its module in both
    assert torch.equal(hooked[len(want) + 2], hooked[2])


def test_sliding_window_and_padding_run_the_eager_forward_where_it_masks():
    native_ops()
    model = build_random("mixtral").to(torch.bfloat16)
    model.layers[1].window = 9  # layer 1 sees 9 slots: the steps past them need a mask
    use_kernel_(model, "auto", linears=True)
    assert_same(model, n=6, ran=9 - len(PROMPT))  # slots 8 and 9; then the eager forward's masks
    assert_same(model, n=5, inactive_at=2, ran=2)  # a padding token: the eager forward from then on


def test_one_row_only_and_only_its_own_cache(tiny_fp32):
    model = tiny_fp32
    one, _ = left_padded_prefill(model, [PROMPT], 2)
    other, _ = left_padded_prefill(model, [PROMPT], 2)
    two, _ = left_padded_prefill(model, [PROMPT, PROMPT[:3]], 2)
    with prepared_cpu_decode(model, two) as program:
        assert program is None and model.decode_program is None
    assert "batch of 2 rows" in cpu_decode_blocker(model, two)
    with pytest.raises(ValueError, match="batch of 2 rows"):
        CpuDecoder(model, two)
    with torch.no_grad(), prepared_cpu_decode(model, one) as program:
        model(torch.tensor([[3]]), cache=other)  # another cache: the ordinary forward
        assert program.steps == 0
        model(torch.tensor([[3]]), cache=one)
        assert program.steps == 1


def test_generate_runs_the_program_and_keeps_its_tokens(tiny_fp32, monkeypatch):
    model = tiny_fp32
    use_kernel_(model, "auto", linears=True)
    calls, real = [], CpuDecoder.__call__

    def counted(self, *args):
        out = real(self, *args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(CpuDecoder, "__call__", counted)
    got = moeinfer.generate(model, [PROMPT], max_new_tokens=6, ignore_eos=True)[0].token_ids
    assert calls == [True] * 5 and model.decode_program is None
    monkeypatch.setattr("moeinfer.engine.generate.prepared_cpu_decode", lambda m, c: contextlib.nullcontext())
    assert moeinfer.generate(model, [PROMPT], max_new_tokens=6, ignore_eos=True)[0].token_ids == got
    assert len(calls) == 5


# --- the batching engine: one-row decode forwards run the program (LocalOps, RowPrograms) ---

def _engine_ops_logits(model, programs: bool, monkeypatch) -> tuple[list, int]:
    """Logits of a batching engine's operation sequence on three cache rows: prefills, one-row decodes,
    a batched decode, a retired row refilled by moving the last one in (KVCache.move_row), and the rows
    decoded alone again; with the rows' programs or with every forward eager. And the program steps."""
    from moeinfer.engine.lockstep import LocalOps
    from moeinfer.model.kv_cache import KVCache

    if not programs:
        monkeypatch.setattr(cpu_decode.RowPrograms, "decoder", lambda self, start, stop, tokens: None)
    ops = LocalOps(model, KVCache(model.config, batch_size=3, max_length=40, dtype=model.dtype))
    out = [ops.forward([PROMPT], 0, 1)]
    for _ in range(3):
        out.append(ops.forward([[int(out[-1][0].argmax())]], 0, 1))
    out.append(ops.forward([[7, 3, 9, 4]], 1, 2))
    out.append(ops.forward([[11], [12]], 0, 2))  # two rows: eager
    out.append(ops.forward([[2, 8]], 2, 3))
    out.append(ops.forward([[13]], 1, 2))
    ops.move_row(2, 0)  # row 0 retired, the last row moved into it
    ops.clear_row(2)
    for _ in range(3):
        out.append(ops.forward([[int(out[-1][0].argmax())]], 0, 1))
    monkeypatch.undo()
    steps = sum(d.steps for d in ops.programs.decoders.values() if d is not None)
    return out, steps


def test_engine_one_row_decodes_run_the_program_with_the_same_logits(monkeypatch):
    native_ops()
    model = build_random("olmoe").to(torch.bfloat16)
    use_kernel_(model, "auto", linears=True)
    want, none = _engine_ops_logits(model, False, monkeypatch)
    got, steps = _engine_ops_logits(model, True, monkeypatch)
    assert none == 0 and steps == 3 + 1 + 3  # every one-row, one-token forward
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"forward {i}: max |diff| {float((a.float() - b.float()).abs().max())}"
    assert model.decode_program is None

"""The prepared one-row CPU decode (moeinfer/engine/cpu_decode.py) against the eager forward: decode steps
from the same prefilled cache give the same logits bit for bit (torch.equal), for every architecture and
dtype, native or eager modules, quantized experts and linears (one width, two widths), offloaded experts,
routing transforms, observers, hooks, sliding windows and padding; and generate uses it."""

from __future__ import annotations

import pytest
import torch

from compress_quant_helpers import ARCHS, build_random
from decode_helpers import left_padded_prefill
from native_helpers import native_ops

import moeinfer
from moeinfer.engine import cpu_decode
from moeinfer.engine.cpu_decode import CpuDecoder, cpu_decode_blocker
from moeinfer.engine.static_decode import decode_step
from moeinfer.formats.quantized_experts import QuantizedExperts
from moeinfer.kernels import use_kernel_

PROMPT = [5, 17, 29, 3, 50, 8, 41]


def eager(model, cache):
    return lambda ids, active: model(ids[:, None], attention_mask=active, cache=cache)[:, -1]


@torch.no_grad()
def steps(model, make, n: int = 5, prompt=PROMPT, inactive_at: int | None = None) -> list[torch.Tensor]:
    """Logits of the prefill and `n` greedy decode steps by `make(model, cache)`; the row is marked
    finished (its tokens padding) from step `inactive_at` on."""
    cache, logits = left_padded_prefill(model, [prompt], n)
    decode = make(model, cache)
    out = [logits]
    for i in range(n):
        active = torch.tensor([[inactive_at is None or i < inactive_at]])
        out.append(decode(out[-1].argmax(-1), active))
    return out


def assert_same(model, **kw) -> None:
    want, got = steps(model, eager, **kw), steps(model, CpuDecoder, **kw)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"step {i}: max |diff| {float((a.float() - b.float()).abs().max())}"


def prepared(model) -> tuple[int, int]:
    """(prepared attentions, prepared expert stages) of a CpuDecoder over `model`."""
    cache, _ = left_padded_prefill(model, [PROMPT], 2)
    layers = CpuDecoder(model, cache).layers
    return (sum(isinstance(l.attn, cpu_decode._Attention) for l in layers),
            sum(isinstance(l.ffn, cpu_decode._MoE) and l.ffn.experts is not None for l in layers))


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
    hooked = []
    model.layers[1].self_attn.register_forward_hook(lambda m, a, out: hooked.append(out.clone()))
    want = steps(model, eager)
    key[0] = "program"
    got = steps(model, CpuDecoder)
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
    assert_same(model, n=6)
    assert_same(model, n=5, inactive_at=2)


def test_decode_step_uses_the_program_on_one_row_only(tiny_fp32):
    model = tiny_fp32
    one, _ = left_padded_prefill(model, [PROMPT], 2)
    two, _ = left_padded_prefill(model, [PROMPT, PROMPT[:3]], 2)
    assert isinstance(decode_step(model, one), CpuDecoder)
    assert cpu_decode_blocker(model, two) is not None and not isinstance(decode_step(model, two), CpuDecoder)
    with pytest.raises(ValueError, match="batch of 2 rows"):
        CpuDecoder(model, two)


def test_generate_runs_the_program_and_keeps_its_tokens(tiny_fp32, monkeypatch):
    model = tiny_fp32
    use_kernel_(model, "auto", linears=True)
    calls = []
    real = CpuDecoder.__call__
    monkeypatch.setattr(CpuDecoder, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    got = moeinfer.generate(model, [PROMPT], max_new_tokens=6, ignore_eos=True)[0].token_ids
    assert len(calls) == 5
    monkeypatch.setattr("moeinfer.engine.generate.decode_step", eager)
    assert moeinfer.generate(model, [PROMPT], max_new_tokens=6, ignore_eos=True)[0].token_ids == got

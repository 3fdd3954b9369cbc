"""Writing a moeinfer model as one GGUF file that llama.cpp (and Ollama, LM Studio) runs.

Shapes: E experts of a layer (after pruning or merging), D hidden, I expert inner size, R router rows.

Steps:
1. map the family to llama.cpp's architecture and refuse what it cannot express (archmap);
2. plan every tensor: its GGUF name (names), ggml type and byte shape, and how to make its bytes;
   - norms, biases and routers: F32 (exact for bf16/f16 weights, as llama.cpp's converter does);
   - other float tensors: BF16, F16 or F32 (the model's dtype, or the one asked for);
   - experts: quantized with the symmetric group-32 scheme (Q8_0/Q4_0) are copied block by block
     without requantizing (blocks); float experts asked for as q8_0/q4_0 are quantized with that
     same scheme (moeinfer.formats.quant, `algorithm="sym"`), so the file holds what
     `compress_(model, "q8_0" | "q4_0")` holds; other widths and formats are rounded up to Q8_0
     (GGUF holds one type per layer's stacked expert tensor) and the report says so;
   - merged experts (Router.expert_map): each merged expert gets the mean of its members' router
     rows (`folded_router`), since llama.cpp routes over the experts it has;
3. write header, metadata, tokenizer and tensor infos, then stream the tensors one at a time
   (a progress bar) into a temporary file that is renamed into place at the end.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moeinfer.config import ModelConfig
from moeinfer.formats.quant.groupwise import quantize
from moeinfer.formats.quantized_experts import QuantizedExperts
from moeinfer.loading.gguf.archmap import check_exportable, family_for_export, write_metadata
from moeinfer.loading.gguf.blocks import BLOCK_BYTES, GROUP, is_ggml_exact, to_ggml
from moeinfer.loading.gguf.deepseek import adjacent_rope_rows, split_kv_b
from moeinfer.loading.gguf.errors import GGUFError
from moeinfer.loading.gguf.names import expert_tensor, permute_qk, qk_heads, to_gguf
from moeinfer.loading.gguf.vocab import write_tokenizer
from moeinfer.model.moe import Experts, MoEBlock
from moeinfer.model.transformer import MoEModel
from moeinfer.formats.layout import set_num_experts_
from moeinfer.fsutil import publishable_

log = logging.getLogger(__name__)

QUANT_CHOICES = ("auto", "bf16", "f16", "f32", "q8_0", "q4_0")
_FLOAT_TYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
_TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_QUANT_BITS = {"Q8_0": 8, "Q4_0": 4}


@dataclass
class ExportReport:
    """What `export_gguf` wrote: the file, each tensor's ggml type, and what it had to change."""

    path: Path
    tensor_types: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensor_types.values():
            counts[t] = counts.get(t, 0) + 1
        return counts


@dataclass
class _Planned:
    name: str
    ggml_type: str  # a gguf.GGMLQuantizationType name
    shape: tuple[int, ...]  # byte shape (uint8), numpy order
    make: Callable[[], torch.Tensor]  # -> uint8 [shape]


def _float_bytes(t: torch.Tensor, ggml_type: str) -> torch.Tensor:
    return t.detach().to("cpu", _TORCH[ggml_type]).contiguous().view(torch.uint8)


def _float_plan(name: str, t: torch.Tensor, ggml_type: str, fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                *, shape: tuple[int, ...] | torch.Size | None = None) -> _Planned:
    """`shape`: the shape `fn(t)` has, when `fn` changes it."""
    size = _TORCH[ggml_type].itemsize
    dims = tuple(shape if shape is not None else t.shape)
    shape = (*dims[:-1], dims[-1] * size)
    return _Planned(name, ggml_type, tuple(shape), lambda: _float_bytes(fn(t) if fn else t, ggml_type))


def _quant_plan(name: str, make: Callable[[], torch.Tensor], lead: tuple[int, ...], cols: int, bits: int) -> _Planned:
    return _Planned(name, f"Q{bits}_0", (*lead, cols // GROUP * BLOCK_BYTES[bits]), make)


def folded_router(block: MoEBlock) -> torch.Tensor:
    """Router rows [E, D] for a layer's E experts: the rows themselves, or for merged experts
    (`gate.expert_map` [R]) the mean of each merged expert's members' rows. The mean is an approximation
    (the softmax of averaged logits is not the sum of the members' probabilities)."""
    w = block.gate.weight.detach()
    emap = block.gate.expert_map
    if emap is None:
        return w
    E = block.experts.num_experts
    out = torch.zeros(E, w.shape[1], dtype=torch.float64)
    out.index_add_(0, emap.cpu(), w.double().cpu())
    counts = torch.bincount(emap.cpu(), minlength=E).clamp(min=1)
    return (out / counts[:, None]).to(w.dtype)


def fold_merged_routers_(model: MoEModel) -> None:
    """Give every merged layer the router GGUF gets (`folded_router`) and drop its expert map, so the
    moeinfer model routes as llama.cpp will route the exported file."""
    for block in model.moe_blocks():
        if block.gate.expert_map is not None:
            rows = folded_router(block)
            set_num_experts_(block, rows.shape[0])
            block.gate.weight = nn.Parameter(rows.clone(), requires_grad=False)
            block.gate.expert_map = None
            block.gate.available = None


def _expert_plans(block: MoEBlock, quant: str, float_type: str, notes: list[str]) -> list[_Planned]:
    """Step 2 for one layer's routed experts: gate, up and down stacked tensors."""
    layer, ex = block.layer_idx, block.experts
    D = block.gate.weight.shape[1]
    names = {p: expert_tensor(layer, p) for p in ("gate", "up", "down")}
    if isinstance(ex, QuantizedExperts):
        I = ex.intermediate_size
        widths = sorted(set(ex.bits))
        exact = len(widths) == 1 and all(
            is_ggml_exact(getattr(ex, f"s{b}_{m}"), getattr(ex, f"z{b}_{m}"), bits=b, group_size=ex.group_size)
            for b in widths for m in ("gate_up", "down"))
        b = widths[-1]
        if exact and quant in ("auto", f"q{b}_0"):
            q, s = getattr(ex, f"q{b}_gate_up"), getattr(ex, f"s{b}_gate_up")
            qd, sd = getattr(ex, f"q{b}_down"), getattr(ex, f"s{b}_down")
            E = q.shape[0]
            return [
                _quant_plan(names["gate"], lambda: to_ggml(q[:, :I], s[:, :I], bits=b, cols=D), (E, I), D, b),
                _quant_plan(names["up"], lambda: to_ggml(q[:, I:], s[:, I:], bits=b, cols=D), (E, I), D, b),
                _quant_plan(names["down"], lambda: to_ggml(qd, sd, bits=b, cols=I), (E, D), I, b),
            ]
        if quant == "auto" or quant.startswith("q"):
            target = 8 if quant == "auto" else int(quant[1])
            counts = {w: ex.bits.count(w) for w in widths}
            what = f"{ex.num_experts} experts at bits {counts}, group {ex.group_size}"
            why = (f"Q{b}_0 blocks, asked for as {quant}" if exact else
                   "not a GGUF block type (GGUF holds one type per layer's stacked expert tensor; moeinfer's "
                   "symmetric group-32 int8/int4 are Q8_0/Q4_0)")
            notes.append(f"layer {layer}: {what}: {why}: requantized to Q{target}_0 from the dequantized weights")
            return _requantized(ex, names, D, I, target)
        gate_up, down = ex.dequantize_all(torch.float32)
        notes.append(f"layer {layer}: quantized experts dequantized to {float_type}")
    elif isinstance(ex, Experts):
        gate_up, down, I = ex.gate_up_proj, ex.down_proj, ex.down_proj.shape[2]
        if quant in ("q8_0", "q4_0"):
            return _requantized(ex, names, D, I, int(quant[1]))
    elif hasattr(ex, "expert_weights"):  # e.g. low-rank experts: GGUF has no factored expert type
        pairs = [ex.expert_weights(e) for e in range(ex.num_experts)]
        gate_up, down = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        I = down.shape[2]
        notes.append(f"layer {layer}: {type(ex).__name__} written as dense {float_type} experts")
        if quant in ("q8_0", "q4_0"):
            return _requantized(ex, names, D, I, int(quant[1]), (gate_up, down))
    else:
        raise GGUFError(f"layer {layer}: experts of kind {type(ex).__name__} cannot be exported to GGUF")
    return [_float_plan(names["gate"], gate_up[:, :I], float_type),
            _float_plan(names["up"], gate_up[:, I:], float_type),
            _float_plan(names["down"], down, float_type)]


def _requantized(ex: nn.Module, names: dict[str, str], D: int, I: int, bits: int,
                 weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[_Planned]:
    """Expert tensors quantized with moeinfer's symmetric scheme (ggml's Q8_0/Q4_0 rounding)."""
    def matrices() -> tuple[torch.Tensor, torch.Tensor]:
        if weights is not None:
            return weights
        if isinstance(ex, Experts):
            return ex.gate_up_proj, ex.down_proj
        return ex.dequantize_all(torch.float32)

    E = ex.num_experts

    def make(part: str) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            gate_up, down = matrices()
            w = down if part == "down" else (gate_up[:, :I] if part == "gate" else gate_up[:, I:])
            cols = w.shape[-1]
            out = []
            for e in range(E):  # one expert at a time, as QuantizedExperts.from_float does
                qt = quantize(w[e], bits=bits, group_size=GROUP, algorithm="sym")
                out.append(to_ggml(qt.packed, qt.scale, bits=bits, cols=cols))
            return torch.stack(out)
        return run

    for cols in (D, I):
        if cols % GROUP:
            raise GGUFError(f"Q{bits}_0 needs expert row lengths that are multiples of {GROUP}; this model has "
                            f"hidden size {D} and expert inner size {I}")
    return [_quant_plan(names["gate"], make("gate"), (E, I), D, bits),
            _quant_plan(names["up"], make("up"), (E, I), D, bits),
            _quant_plan(names["down"], make("down"), (E, D), I, bits)]


def plan_tensors(model: MoEModel, quant: str, notes: list[str]) -> list[_Planned]:
    """Step 2: every tensor of the file, in the order llama.cpp's converter writes them (global, then by layer)."""
    cfg = model.config
    float_type = {"bf16": "BF16", "f16": "F16", "f32": "F32"}.get(quant) or _FLOAT_TYPES.get(model.dtype, "F32")
    family = family_for_export(cfg)
    plans: list[_Planned] = []
    unmapped: list[str] = []
    blocks = {b.layer_idx: b for b in model.moe_blocks()}
    biases = [(n, b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    for name, p in [*model.named_parameters(), *biases]:
        if ".mlp.experts." in name:
            continue
        gname = to_gguf(name)
        if gname is None:
            unmapped.append(name)
            continue
        heads = qk_heads(name, cfg.num_heads, cfg.num_kv_heads) if family.permute_qk else None
        fn = (lambda t, h=heads: permute_qk(t, h)) if heads else None
        if cfg.mla is not None and not cfg.rope.interleaved:
            fn = (lambda t, n=name: adjacent_rope_rows(n, t, cfg))
        if name.endswith("self_attn.kv_b_proj.weight"):
            plans += _kv_b_plans(gname, p, cfg, float_type)
        elif name.endswith(".mlp.gate.weight"):
            layer = int(name.split(".")[1])
            plans.append(_float_plan(gname, folded_router(blocks[layer]), "F32"))
        elif name.endswith("shared_expert_gate.weight"):
            plans.append(_float_plan(gname, p.reshape(-1), "F32"))  # llama.cpp reads it as a [D] vector
        elif p.dim() == 1:
            plans.append(_float_plan(gname, p, "F32", fn))
        else:
            plans.append(_float_plan(gname, p, float_type, fn))
    for b in model.moe_blocks():
        if b.gate.expert_map is not None:
            notes.append(f"layer {b.layer_idx}: {b.gate.weight.shape[0]} router rows merged onto "
                         f"{b.experts.num_experts} experts; each merged expert's router row is the mean of its "
                         "members' (llama.cpp routes over the experts it has)")
        if b.gate.available is not None and not bool(b.gate.available.all()):
            masked = (~b.gate.available).nonzero().flatten().tolist()
            notes.append(f"layer {b.layer_idx}: masked experts {masked} are written as they are; llama.cpp has no "
                         "mask and may route tokens to them")
        if b.gate.mode is not None or b.gate.top_k is not None:
            notes.append(f"layer {b.layer_idx}: dynamic gating is not written (GGUF has a fixed top-k)")
        plans += _expert_plans(b, quant, float_type, notes)
        if b.gate.expert_map is not None and b.gate.e_score_correction_bias is not None:
            raise GGUFError(f"layer {b.layer_idx}: merged experts with a correction bias cannot be folded into "
                            "llama.cpp's router")
    if unmapped:
        raise GGUFError(f"{len(unmapped)} tensor(s) have no GGUF name for llama.cpp's {family.arch!r}: "
                        f"{', '.join(unmapped[:6])}"
                        + (" (modules replaced by compression, e.g. quantized attention, are moeinfer-format only)"
                           if any(".self_attn." in n or n.startswith("lm_head") for n in unmapped) else ""))
    return plans


def _kv_b_plans(gname: str, w: torch.Tensor, cfg: ModelConfig, float_type: str) -> list[_Planned]:
    """MLA's kv_b_proj [H*(Dn+Dv), C] as llama.cpp's attn_k_b [H, C, Dn] and attn_v_b [H, Dv, C]."""
    mla = cfg.mla
    assert mla is not None
    H, C, Dn, Dv = cfg.num_heads, mla.kv_lora_rank, mla.qk_nope_head_dim, mla.v_head_dim

    def part(i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda t: split_kv_b(t, heads=H, nope=Dn, v_dim=Dv)[i]

    return [_float_plan(gname.replace("attn_kv_b", "attn_k_b"), w, float_type, part(0), shape=(H, C, Dn)),
            _float_plan(gname.replace("attn_kv_b", "attn_v_b"), w, float_type, part(1), shape=(H, Dv, C))]


def _file_type(quant: str, plans: list[_Planned]) -> int:
    from gguf import LlamaFileType

    types = {p.ggml_type for p in plans if p.name.endswith("_exps.weight")}
    if "Q4_0" in types:
        return int(LlamaFileType.MOSTLY_Q4_0)
    if "Q8_0" in types:
        return int(LlamaFileType.MOSTLY_Q8_0)
    return int({"BF16": LlamaFileType.MOSTLY_BF16, "F16": LlamaFileType.MOSTLY_F16}.get(
        plans[0].ggml_type if plans else "F32", LlamaFileType.ALL_F32))


def export_gguf(model: MoEModel, path: str | os.PathLike[str], *, quant: str = "auto", overwrite: bool = False,
                progress: bool = True, name: str | None = None) -> ExportReport:
    """Write `model` to `path` as GGUF; see the module docstring for the steps.

    quant: "auto" (float tensors in the model's dtype, quantized experts as they are: Q8_0/Q4_0 when they
    use the symmetric group-32 scheme, else rounded up to Q8_0), "bf16"/"f16"/"f32" (everything float),
    or "q8_0"/"q4_0" (routed experts in that ggml type; the rest in the model's float dtype).
    overwrite: replace an existing file (otherwise an existing `path` is an error)."""
    import gguf
    from tqdm.auto import tqdm

    if quant not in QUANT_CHOICES:
        raise ValueError(f"quant must be one of {', '.join(QUANT_CHOICES)}, got {quant!r}")
    out = Path(path)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if out.is_dir():
        raise GGUFError(f"{out} is a directory; give the path of the .gguf file to write")
    cfg = model.config
    # 1. the family and what llama.cpp can express
    family = family_for_export(cfg)
    counts = sorted({b.experts.num_experts for b in model.moe_blocks()})
    if len(counts) != 1:
        raise GGUFError(f"the MoE layers hold different expert counts {counts}; GGUF has one {family.arch}.expert_count"
                        " for every layer")
    report = ExportReport(path=out, notes=check_exportable(cfg, family, counts[0]))
    if model.tokenizer is None:
        raise GGUFError("the model has no tokenizer; GGUF files carry one (load the model from a checkpoint with "
                        "tokenizer.json)")
    # 2. the tensors
    plans = plan_tensors(model, quant, report.notes)
    writer = gguf.GGUFWriter(None, family.arch)
    writer.add_name(name or (Path(model.source_dir).name if model.source_dir else "moeinfer"))
    writer.add_file_type(_file_type(quant, plans))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_metadata(writer, cfg, family, num_experts=counts[0])
    write_tokenizer(writer, model.tokenizer, cfg.vocab_size, bos=cfg.bos_token_id,
                    eos=cfg.eos_token_ids[0] if cfg.eos_token_ids else None, pad=cfg.pad_token_id)
    for p in plans:
        nbytes = 1
        for s in p.shape:
            nbytes *= s
        writer.add_tensor_info(p.name, p.shape, np.dtype(np.uint8), nbytes,
                               raw_dtype=gguf.GGMLQuantizationType[p.ggml_type])
        report.tensor_types[p.name] = p.ggml_type
    # 3. stream into a temp file, then rename
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    total = sum(writer.tensors[0][p.name].nbytes for p in plans)
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with torch.no_grad(), tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {out.name}",
                                   disable=not progress or None) as bar:
            for p in plans:
                data = p.make()
                if tuple(data.shape) != p.shape:
                    raise GGUFError(f"internal: tensor {p.name} made {tuple(data.shape)} bytes, planned {p.shape}")
                writer.write_tensor_data(data.contiguous().numpy())
                bar.update(data.numel())
        writer.close()

        publishable_(tmp)
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    for note in report.notes:
        log.warning("%s: %s", out.name, note)
    return report

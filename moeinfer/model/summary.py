"""What a model is made of: parameters total and active per token, bytes by component, layers."""

from __future__ import annotations

from typing import Any

from moeinfer.model.moe import MoEBlock
from moeinfer.model.transformer import MoEModel


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def expert_storage(model: MoEModel) -> tuple[int, int]:
    """(weights, bytes as stored) of one routed expert, averaged over the MoE layers' experts.

    Plain experts: 3 * D * I weights at the model's dtype. Compressed experts (packed low-bit codes,
    low-rank factors) store fewer bytes for the same weights; offloaded experts hold none resident,
    and count at the dtype they are computed in."""
    cfg = model.config
    weights = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    blocks = model.moe_blocks()
    stored = sum(t.numel() * t.element_size() for b in blocks
                 for t in list(b.experts.parameters()) + list(b.experts.buffers()))
    count = sum(b.experts.num_experts for b in blocks)
    if not blocks or stored == 0:
        return weights, weights * model.dtype.itemsize
    return weights, stored // count


def summarize(model: MoEModel) -> dict[str, Any]:
    cfg = model.config
    counts = model.num_parameters()
    experts, shared, router, attention, dense, embed, norms = [], [], [], [], [], [], []
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if ".experts." in name:
            experts.append(p)
        elif ".shared_expert" in name:
            shared.append(p)
        elif ".mlp.gate." in name:
            router.append(p)
        elif ".self_attn." in name:
            attention.append(p)
        elif ".mlp." in name:
            dense.append(p)
        elif name.startswith(("embed_tokens", "lm_head")):
            embed.append(p)
        else:
            norms.append(p)
    layers = []
    for i, layer in enumerate(model.layers):
        block = layer.mlp
        if isinstance(block, MoEBlock):
            layers.append(dict(layer=i, ffn="moe", experts=block.experts.num_experts,
                               top_k=block.gate.top_k or cfg.top_k,
                               expert_inner=cfg.moe_intermediate_size, experts_kind=type(block.experts).__name__,
                               shared_inner=cfg.shared_intermediate_size))
        else:
            layers.append(dict(layer=i, ffn="dense", dense_inner=cfg.intermediate_size))
    return dict(
        model_type=cfg.model_type, attention=cfg.attention, num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, dtype=str(model.dtype).removeprefix("torch."),
        params_total=counts["total"], params_active=counts["active"],
        bytes=dict(experts=_bytes(experts), shared_experts=_bytes(shared), routers=_bytes(router),
                   attention=_bytes(attention), dense_ffn=_bytes(dense), embeddings=_bytes(embed),
                   norms=_bytes(norms)),
        layers=layers,
    )

"""What a model is made of: parameters total and active per token, bytes by component, layers."""

from __future__ import annotations

from typing import Any

from moeinfer.model.moe import MoEBlock
from moeinfer.model.transformer import MoEModel


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


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
                               expert_inner=block.experts.down_proj.shape[-1],
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

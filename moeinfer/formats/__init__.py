"""Stored formats shared by the loader and the optimizations (floor 1 of docs/architecture.md):
group-wise quantized tensors (`quant`), the experts and linear modules that hold them
(`quantized_experts`, `lowrank_experts`, `quantized_linear`), and the compressed-layout record a
checkpoint's config.json carries (`layout`), so `moeinfer.load` rebuilds a compressed model without
importing `moeinfer.compress`."""

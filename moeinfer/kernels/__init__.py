"""Fast kernels for the MoE block's expert stage, chosen at run time by name.

    use_kernel_(model, "auto")          # in place: every MoE block uses the best usable kernel
    get_kernel("cpu")(x, indices, weights, gate_up, down, expert_map=None) -> out

Backends (one file each): `reference` (the eager stages of moeinfer/model/moe.py), `cpu`
(grouped GEMMs on active experts), `triton` (fused MoE for CUDA; Triton's interpreter on CPU in
tests). Native CPU kernels (C++, `native/`, built by `make install`) serve the `cpu` kernel's batch-1
decode, quantized experts on the CPU (`quantized_cpu.py`), bf16 dense linears (`linear.py`,
`use_cpu_linears_`), RMSNorms (`norm.py`, `use_cpu_norms_`), rotary embeddings (`rope.py`,
`use_cpu_rope_`), one-token attention (`attention.py`, `use_cpu_attention_`) and one-token router
logits (`router.py`, `use_cpu_router_`). Importing this
package imports no optional dependency and loads no library:
triton is imported and the native library loaded on first use.
"""

from __future__ import annotations

from moeinfer.kernels.registry import (CHOICES, KERNELS, KernelSpec, KernelUnavailableError, MoEKernel,
                                       get_kernel, register_kernel, resolve)
from moeinfer.kernels.attention import use_cpu_attention_
from moeinfer.kernels.linear import use_cpu_linears_
from moeinfer.kernels.norm import use_cpu_norms_
from moeinfer.kernels.rope import use_cpu_rope_
from moeinfer.kernels.router import use_cpu_router_
from moeinfer.kernels.select import use_kernel_, use_native_dense_

__all__ = ["CHOICES", "KERNELS", "KernelSpec", "KernelUnavailableError", "MoEKernel", "get_kernel",
           "register_kernel", "resolve", "use_cpu_attention_", "use_cpu_linears_", "use_cpu_norms_",
           "use_cpu_rope_", "use_cpu_router_", "use_kernel_", "use_native_dense_"]

"""CPU-assisted experts: compute a missing expert where its weights live instead of fetching it.

Follows Fiddler (Kamahori et al., 2024), llama.cpp `--cpu-moe` and KTransformers: for a few tokens,
sending the activations to the CPU and computing there beats moving the expert's weights over the
link. Shapes: n tokens of one expert, D hidden, I expert inner size.

1. Calibrate once at start-up (`calibrate`): the link bandwidth (timed reads of experts from the
   slow tier) and the CPU's expert throughput (timed SwiGLU expert on the CPU with the weights in
   host memory).
2. Per missing expert, `CostModel.prefer_cpu(tokens)`: compute on the CPU when
   weights_read_s + n x cpu_s_per_token + n x activation bytes / link  <  expert bytes / link,
   where weights_read_s is 0 for host-resident weights (the "cpu" tier) and expert bytes / link for
   the disk tier (the CPU must read them too, so assisting never pays there).
3. `compute_on_cpu`: the assisted experts of a visit run in a thread pool (torch's matmuls release
   the GIL), each on its token segment moved to the CPU and back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from moeinfer.model.mlp import swiglu
from moeinfer.timing import time_call

Key = tuple[int, int]


@dataclass(frozen=True)
class CostModel:
    """Seconds to fetch an expert vs to compute it on the CPU (step 2)."""

    expert_bytes: int
    activation_bytes: int  # one token's activations there and back (2 x D x dtype bytes)
    link_bytes_per_s: float
    cpu_s_per_token: float
    cpu_s_fixed: float  # per expert call: reading its weights from host memory, dispatch
    weights_on_host: bool = True  # False for the disk tier: the CPU would read them from disk too

    def __post_init__(self) -> None:
        if self.link_bytes_per_s <= 0 or self.cpu_s_per_token < 0 or self.cpu_s_fixed < 0:
            raise ValueError(f"cost model needs a positive link bandwidth and non-negative CPU times: {self}")

    def transfer_s(self) -> float:
        return self.expert_bytes / self.link_bytes_per_s

    def cpu_s(self, tokens: int) -> float:
        read = 0.0 if self.weights_on_host else self.transfer_s()
        return read + self.cpu_s_fixed + tokens * (self.cpu_s_per_token + self.activation_bytes / self.link_bytes_per_s)

    def prefer_cpu(self, key: Key, tokens: int) -> bool:
        return self.cpu_s(tokens) < self.transfer_s()


def calibrate(*, read: Callable[[Key, torch.Tensor, torch.Tensor], None], keys: Sequence[Key],
              gate_up_shape: tuple[int, ...], down_shape: tuple[int, ...], dtype: torch.dtype,
              weights_on_host: bool, repeats: int = 3, device: torch.device | str = "cpu") -> CostModel:
    """Time expert transfers and a CPU expert (step 1); medians of `repeats` runs.

    `read(key, gate_up, down)` is the whole transfer into buffers on `device` (offload_ passes its
    loader: slow tier -> fast tier, waited for), so the link measured is the one loads will use."""
    g0, d0 = torch.empty(gate_up_shape, dtype=dtype, device=device), torch.empty(down_shape, dtype=dtype, device=device)
    calls = iter(range(repeats))
    read_s = time_call(lambda: read(keys[next(calls) % len(keys)], g0, d0), warmup=0, reps=repeats)
    g, d = g0.cpu(), d0.cpu()
    nbytes = (g.numel() + d.numel()) * g.element_size()
    D = gate_up_shape[1]
    per: dict[int, float] = {}
    for n in (1, 16):
        x = torch.randn(n, D).to(dtype)
        per[n] = time_call(lambda: swiglu(x, g, d), warmup=1, reps=repeats)
    per_token = max((per[16] - per[1]) / 15, 0.0)
    return CostModel(expert_bytes=nbytes, activation_bytes=2 * D * g.element_size(),
                     link_bytes_per_s=nbytes / max(read_s, 1e-9),
                     cpu_s_per_token=per_token, cpu_s_fixed=max(per[1] - per_token, 0.0),
                     weights_on_host=weights_on_host)


class CpuExperts:
    """Runs assisted experts on the CPU, several at once (step 3)."""

    def __init__(self, threads: int = 2) -> None:
        self.pool = ThreadPoolExecutor(max_workers=max(threads, 1), thread_name_prefix="moeinfer-cpu-expert")

    def compute(self, jobs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """jobs: (x [n, D] on any device, gate_up, down on the CPU) -> outputs on x's device."""
        def one(job: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, gate_up, down = job
            return swiglu(x.to("cpu"), gate_up, down).to(x.device)

        if len(jobs) == 1:
            return [one(jobs[0])]
        return list(self.pool.map(one, jobs))

    def close(self) -> None:
        self.pool.shutdown(wait=True)

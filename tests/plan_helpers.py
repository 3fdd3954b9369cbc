"""Shared pieces of the planner tests: a synthetic machine profile (tests never time anything) and a
hand-made quality model."""

from __future__ import annotations

from moeinfer.planning.profile import ExpertRate, MachineProfile
from moeinfer.planning.quality import QualityModel
from moeinfer.planning.spec import FLOAT


def synthetic_profile(*, int4_bytes_per_s: float = 8e9, device: str = "cpu") -> MachineProfile:
    """A machine whose rates are known: float experts stream at 4 GB/s with the cpu kernel (2 GB/s with the
    reference), int8 at 6 GB/s, int4 at `int4_bytes_per_s`; a 1 GB/s disk."""
    def rate(bw: float) -> ExpertRate:
        return ExpertRate(call_s=1e-5, expert_fixed_s=2e-6, bytes_per_s=bw, flops_per_s=50e9)

    return MachineProfile(key="synthetic", device=device, cpu="test cpu", threads=1, torch_version="test",
                          link="disk", link_gbps=1.0, mem_read_gbps=10.0, matmul_gflops=50.0, layer_fixed_s=1e-4,
                          step_fixed_s=2e-4,
                          experts={"bf16/reference": rate(2e9), "bf16/cpu": rate(4e9), "int8": rate(6e9),
                                   "int4": rate(int4_bytes_per_s)},
                          measured="synthetic (tests)")


def toy_quality(num_layers: int, *, int8: float = 0.001, int4: float = 0.02, alpha: float = 1.0,
                base_bpb: float = 2.0) -> QualityModel:
    """Layer l's error grows with l: the last layers are the most sensitive."""
    return QualityModel(base_bpb=base_bpb, alpha=alpha,
                        errors={FLOAT: [0.0] * num_layers, "int8": [int8 * (1 + l) for l in range(num_layers)],
                                "int4": [int4 * (1 + l) for l in range(num_layers)]},
                        fit={}, source="toy")

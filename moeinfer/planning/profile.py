"""The machine profile the planner's cost model reads: measured once, cached per machine.

What is measured (about 10 s on a CPU; each figure the median of a few runs — until profile version
15 the least, on the argument that other processes only ever add time, but on the Intel development VM
a run in a passing fast phase of the machine, 1.3-1.7x faster for everything, set the least, and the
planner benchmark reports the median round; models compared with each other run in turn, each priced
against the first one's median time in the same rounds, moeinfer/planning/in_turn.py: a difference of
two times taken in different phases of a drifting VM is not the models' difference):
1. link: cold disk reads on a CPU (`moeinfer.offload.hardware.calibrate`, the figure `moeinfer
   simulate --calibrate` measures) and reads of a file the page cache holds (`cached_link_gbps`: a
   disk tier that fits in the memory a plan leaves free is read from RAM, not from the disk),
   pinned host-to-device copies on CUDA; on a CPU, how much of such a read hides behind expert
   decode running at the same time (`read_overlap`, moeinfer/planning/reads.py: the simulator
   overlaps a layer's loads with its compute only where it does); memory read bandwidth
   (a reduction over a 256 MiB tensor) and dense fp32 matmul rate (on CUDA: of the GPU, and of the
   host too, which prices CPU-assisted experts); on the dense path a planned model runs
   (moeinfer/planning/dense.py: the native CPU kernels where they are built, else torch), the rate of
   a prefill-sized linear in fp32, bf16 and fp16 (the dense part and LM head run in the checkpoint's
   dtype: bf16 is several times slower than fp32 on a CPU without bf16 instructions), and the read
   rate of a one-token bf16 linear whose weight is 8x the last-level cache, at least 256 MiB
   (`dense_read_gbps`, `streamed_bytes`: what a decode token's attention and LM head stream from memory);
2. per expert-stage variant (precision x kernel: bf16 with each usable kernel, bf16 with fp32
   compute weights, and each quantize preset the search may choose): the time of one experts
   module forward at two sizes and two top-k values, fitted to
       call_s + active experts x (expert_fixed_s + stored expert bytes / bytes_per_s)      (decode)
   and, at 64 tokens, at both sizes: their difference gives a matmul rate `flops_per_s`, the rest of
   the small size's time the host cost of each token routed to an expert beyond its first (`slot_s`:
   dispatch, gathers, scatter-add; prefill: an expert costs expert_fixed_s + max(bytes / bytes_per_s,
   6 D I tokens / flops_per_s) + (tokens - 1) slot_s). Both sizes fit in the
   last-level cache (`llc_bytes`, read from sysfs), where the weights stay between calls; a third
   measurement, two experts of `streamed_bytes` together, gives the decode rate of weights
   streamed from memory (`stream_bytes_per_s`), which an expert gets when the weights a decode step
   reads do not fit in the cache (a real-size model: a 352 MB Mixtral expert ran at ~12 GB/s on the
   native kernel where the in-cache fit said 18-27); every variant's in turn with step 1's dense read,
   all priced against its median (`streamed_in_turn`), so the variants' streamed rates and
   `dense_read_gbps` sit on one level;
3. fixed costs outside the experts: one-token forwards of two small random models (1 and 3
   layers, on the planned dense path) give the per-layer cost of attention, norms and router (`layer_fixed_s`) and the
   per-step cost of embeddings, head and Python (`step_fixed_s`); prefill forwards of 64 tokens of the
   same models give the per-layer cost of each token beyond the first (`layer_token_s`: norms,
   rotation, attention rows, the router's top-k, which the dense matmul rate does not price);
4. host costs of offloading: decode steps of the 3-layer model offloaded with every expert it uses
   cached, then with 2 slots, against resident: the time an offloaded layer visit adds (`offload_layer_s`) and a
   load adds beyond its bytes over the link (`load_latency_s`: thread hand-off, lookup, slot copy);
   the same for a prompt's forward (`OffloadHost.prompt_layer_s`, `prompt_load_s`: a prompt's visit
   books many rows, and its loads land while its experts compute).
   Measured for float experts and, on a CPU, again for each quantize preset of step 2 and for float
   experts on the 'cpu' kernel (`offload_host`, keys "int4", ..., "bf16/cpu"):
   offloaded quantized experts run one native call per cached expert on the slot's codes
   (moeinfer/offload/packed.py) where the resident layer runs one call for all its experts, so their
   visit costs more than a float one's; the figure is always offloaded-minus-resident at the same
   precision, so it adds to the resident variant's rate without counting anything twice.
The profile is keyed by device, CPU model and flags, thread count, torch version and the native CPU
kernels' source stamp (none when they are not built or stale), and cached as
JSON in the user cache folder (`$MOEINFER_CACHE_DIR`, else `$XDG_CACHE_HOME/moeinfer`, else
`~/.cache/moeinfer`), so `moeinfer plan` measures a machine once. Costs measured on a planned model's
own shapes (its prompt forwards, its experts on prompts and in a decode step) are added to the same
file, once per shape (`shapes`; moeinfer/planning/shape_profile.py): the small-model figures above do
not carry over to them.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from moeinfer.cpuinfo import cpu_flags, cpu_name, last_level_cache_bytes
from moeinfer.fsutil import atomic_write_text
from moeinfer.arch import parse_config
from moeinfer.compress.methods.quantize_layers import layer_quantizer
from moeinfer.formats.quant.groupwise import num_groups
from moeinfer.formats.quant.packing import packed_cols
from moeinfer.formats.quantized_experts import QuantizedExperts
from moeinfer.kernels import use_kernel_
from moeinfer.kernels.native.build import is_current, library_path
from moeinfer.kernels.registry import KernelUnavailableError, resolve
from moeinfer.model.moe import Experts, Routing
from moeinfer.model.transformer import MoEModel
from moeinfer.offload.apply import offload_
from moeinfer.offload.config import OffloadConfig
from moeinfer.offload.hardware import HardwareProfile, calibrate
from moeinfer.planning.dense import native_dense, use_planned_dense_
from moeinfer.planning.reads import cached_read_gbps, read_overlap
from moeinfer.planning.in_turn import priced_by_reference, priced_by_shared_reference, rounds_in_turn, timed
from moeinfer.planning.shape_costs import (
    ShapeCosts, prefill_in_turn, prefill_seconds, prompt_ids, step_changes, token_stamps)

PROFILE_VERSION = 18  # 2: the least of the repeats, not the median; 3: dense matmul rate per dtype;
# 4: host costs of offloaded layers and loads; 5: those host costs per precision (offload_host), and
# page-cached disk reads (cached_link_gbps); 6: the planned dense path (native where built) and its
# read rate beyond the last-level cache (dense_read_gbps), experts streamed from memory
# (stream_bytes_per_s, llc_bytes), reads hidden behind compute (read_overlap); 7: fixed costs with the
# experts on the 'cpu' kernel where it runs (measure_fixed); 8: one-row CPU decode steps run the prepared
# program (moeinfer.engine.cpu_decode) and native router logits, which lower the fixed costs it measures;
# one-token expert calls timed as the program makes them (the modules' prepared `decode_op`); 9: the
# random models frozen as loaded ones are (their linears prepared too), offload host costs from decode
# steps through the program (measure_offload); 10: prefill's per-token host costs, per layer
# (layer_token_s, measure_prefill_tokens) and per token routed to an expert (ExpertRate.slot_s); 11:
# streamed-weight rates (dense_read_gbps, stream_bytes_per_s) read `streamed_bytes` (8x the reported
# last-level cache, at least 256 MiB), not twice the cache, which partly stayed cached; 12: models timed in
# turn priced against the first one's time in the same rounds (fixed costs, offload host costs, prefill's
# per-token costs), not each the least of its own rounds; 13: offload host costs of prompts
# (OffloadHost.prompt_layer_s, prompt_load_s); 14: models in turn priced at the first one's median time;
# 15: every timed figure the median of its runs (`median_time`), not the least; 16: a decode round's figure
# the generation's mean step (decode_gap_rounds), not its median step; 17: the streamed-weight rates
# (stream_bytes_per_s of every variant, dense_read_gbps) measured in turn, on one level (streamed_in_turn);
# 18: read_overlap's read a quarter of its expert call's bytes (_read_overlap, READ_SHARE)
PROMPT_TOKENS = 32  # measure_offload's prompt: every expert of the random model's layers routed to
DENSE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ExpertRate:
    """Fitted cost of one expert-stage variant (step 2 of the module docstring)."""

    call_s: float  # per experts-module call
    expert_fixed_s: float  # per active expert
    bytes_per_s: float  # stored weight bytes read per second (decode), weights in the last-level cache
    flops_per_s: float  # at many tokens per expert (prefill)
    # the same with the weights streamed from memory (None: not measured, a synthetic or older profile)
    stream_bytes_per_s: float | None = None
    # per token routed to an expert beyond its first in one call (dispatch, gathers, scatter-add: host
    # work that does not scale with the expert's size; a prefill of a small model is mostly this)
    slot_s: float = 0.0

    def read_rate(self, streamed: bool) -> float:
        """Decode bytes per second: streamed from memory (when measured) or from the cache."""
        return self.stream_bytes_per_s if streamed and self.stream_bytes_per_s else self.bytes_per_s

    def expert_s(self, nbytes: float, flops: float, *, streamed: bool = False, tokens: int = 1) -> float:
        """One expert with `tokens` tokens: fixed cost + the larger of its bytes' read time and its flops'
        time + the per-token host cost of its tokens beyond the first; `streamed`: its weights come from
        memory, not the last-level cache."""
        return (self.expert_fixed_s + max(nbytes / self.read_rate(streamed), flops / self.flops_per_s)
                + max(0, tokens - 1) * self.slot_s)


@dataclass(frozen=True)
class OffloadHost:
    """Host costs of an offloaded layer at one precision (step 4 of the module docstring)."""

    layer_s: float  # per offloaded layer visit, beyond a resident layer of the same precision
    load_latency_s: float  # per load, beyond its stored bytes over the link
    # the same in a prompt's forward (None: not measured, an older profile: the figures above)
    prompt_layer_s: float | None = None
    prompt_load_s: float | None = None


@dataclass(frozen=True)
class MachineProfile:
    key: str
    device: str
    cpu: str
    threads: int
    torch_version: str
    link: str  # "disk" (CPU: the slow tier is a disk store) or "host" (CUDA: pinned host memory)
    link_gbps: float
    mem_read_gbps: float
    matmul_gflops: float  # dense fp32
    layer_fixed_s: float
    step_fixed_s: float
    experts: dict[str, ExpertRate] = field(default_factory=dict)  # "bf16/cpu", "bf16/cpu+fp32", "int4", ...
    # per token beyond the first of a forward, per layer: the dense part's host work on T rows (norms,
    # rotation, attention's softmax rows, the router's top-k) that its matmul rate does not price
    layer_token_s: float = 0.0
    measured: str = ""  # when and how
    host_mem_gbps: float | None = None  # CUDA: the host's read bandwidth and fp32 matmul (CPU-assisted experts)
    host_gflops: float | None = None
    # dtype name -> GFLOP/s of a [64, 1024] x [1024, 4096] linear in that dtype on the device: the dense
    # part and LM head run in the checkpoint's dtype, and bf16 matmuls on a CPU without bf16
    # instructions are several times slower than fp32 ones
    dense_gflops: dict[str, float] = field(default_factory=dict)
    # offloaded layers (step 4): host time per layer visit beyond a resident layer's, and per load
    # beyond its bytes over the link (thread hand-off, store lookup, slot copy)
    offload_layer_s: float = 0.0
    load_latency_s: float = 0.0
    # the same per quantize preset ("int4", ...): offloaded quantized layers (float: the two fields above)
    offload_host: dict[str, OffloadHost] = field(default_factory=dict)
    # CPU: GB/s of reads from a disk-tier file the page cache holds (None: not measured; a synthetic profile)
    cached_link_gbps: float | None = None
    # bytes of the last-level cache (0: unknown, a synthetic profile: nothing is priced as streamed)
    llc_bytes: int = 0
    # GB/s of a one-token bf16 linear on the planned dense path, weight beyond the last-level cache
    # (None: not measured, a synthetic or older profile: the memory read rate serves)
    dense_read_gbps: float | None = None
    # CPU: share of a page-cached read hidden behind expert decode at the same time (None: not measured)
    read_overlap: float | None = None
    # costs measured on a planned model's own shapes, per shape (shape_costs.shape_key), when a model of
    # it is planned (moeinfer.planning.shape_profile.with_shape_costs)
    shapes: dict[str, ShapeCosts] = field(default_factory=dict)
    version: int = PROFILE_VERSION

    def overlaps_reads(self) -> bool:
        """Whether an offloaded layer's loads proceed while its experts compute (the simulator's
        `overlap`): where the profile measured at least half of a read hidden (not measured: yes)."""
        return self.read_overlap is None or self.read_overlap >= 0.5

    def dense_read_rate(self) -> float:
        """Bytes per second a decode token's dense weights (attention, LM head) are read at."""
        return (self.dense_read_gbps or self.mem_read_gbps) * 1e9

    def streams(self, step_bytes: float) -> bool:
        """Whether weights read `step_bytes` per decode step come from memory: they do not fit in the
        last-level cache together, so each is evicted before the next step reads it again."""
        return self.llc_bytes > 0 and step_bytes > self.llc_bytes
    def matmul_rate(self, dtype: str) -> float:
        """FLOP/s of dense matmuls in `dtype` ("bfloat16", ...); the fp32 rate for a dtype not measured
        (a synthetic profile)."""
        return self.dense_gflops.get(dtype, self.matmul_gflops) * 1e9

    def rate(self, variant: str) -> ExpertRate:
        if variant not in self.experts:
            raise ValueError(f"machine profile {self.key}: no measurement for expert variant {variant!r}; "
                             f"measured: {', '.join(sorted(self.experts))}")
        return self.experts[variant]

    def offload_costs(self, precision: str = "bf16", shape: ShapeCosts | None = None) -> OffloadHost:
        """Host costs of an offloaded layer whose experts are at `precision` (a quantize preset, or
        "bf16"); a preset not measured (an older or synthetic profile) gets the float figures. `shape`:
        the planned model's shape costs, whose own figures for `precision` win where they were measured
        (moeinfer/planning/shape_profile.py step 5; a prompt's scaled to the state a prompt meets,
        `ShapeCosts.after_decode`, as the shape's other prompt costs are)."""
        on_shape = shape.offload_host.get(precision) if shape is not None else None
        if on_shape is not None:
            layer_s, load_s, prompt_layer_s, prompt_load_s = on_shape
            return OffloadHost(layer_s, load_s, shape.after_decode * prompt_layer_s, shape.after_decode * prompt_load_s)
        fallback = self.offload_host.get("bf16", OffloadHost(self.offload_layer_s, self.load_latency_s))
        return self.offload_host.get(precision, fallback)

    def effective_link_gbps(self, cached_fraction: float = 0.0) -> float:
        """The link's GB/s when `cached_fraction` of the bytes it moves come from the page cache (the
        rest from the disk): time per byte blended, 1 / (f / cached + (1 - f) / cold)."""
        f = min(1.0, max(0.0, cached_fraction))
        if self.cached_link_gbps is None or f == 0.0:
            return self.link_gbps
        return 1.0 / (f / self.cached_link_gbps + (1.0 - f) / self.link_gbps)

    def hardware(self, *, offloaded: bool = False, precision: str = "bf16", cached_fraction: float = 0.0,
                 shape: ShapeCosts | None = None) -> Any:
        """The offload simulator's HardwareProfile for this machine (its link and fallback rates); with
        `offloaded`, the host costs of offloaded layers and loads of experts at `precision` too (the
        simulator charges them on every visit, so a resident configuration is simulated without them;
        those of the planned model's `shape` where measured: `offload_costs`), and a link of which
        `cached_fraction` is read from the page cache (`effective_link_gbps`)."""
        host = self.offload_costs(precision, shape)
        extra: dict[str, Any] = {}
        if offloaded:
            extra = {"host_us_per_layer": 1e6 * host.layer_s, "link_latency_us": 1e6 * host.load_latency_s}
            if host.prompt_layer_s is not None and host.prompt_load_s is not None:
                extra.update(prompt_host_us_per_layer=1e6 * host.prompt_layer_s,
                             prompt_link_latency_us=1e6 * host.prompt_load_s)
        link = self.effective_link_gbps(cached_fraction) if offloaded else self.link_gbps
        return HardwareProfile(name=f"measured-{self.key[:8]}", link_gbps=link, **extra,
                               fast_mem_gbps=self.mem_read_gbps, compute_tflops=self.matmul_gflops / 1e3,
                               cpu_mem_gbps=self.host_mem_gbps or self.mem_read_gbps,
                               cpu_gflops=self.host_gflops or self.matmul_gflops, measured=True,
                               description=f"moeinfer plan machine profile ({self.cpu}, {self.threads} threads)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MachineProfile:
        d = dict(d)
        d["experts"] = {k: ExpertRate(**v) for k, v in d.get("experts", {}).items()}
        d["offload_host"] = {k: OffloadHost(**v) for k, v in d.get("offload_host", {}).items()}
        d["shapes"] = {k: ShapeCosts.from_dict(v) for k, v in d.get("shapes", {}).items()}
        return cls(**d)


# --- identity and cache ---

def cache_dir() -> Path:
    env = os.environ.get("MOEINFER_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "moeinfer"


def _cpu_identity() -> tuple[str, str]:
    return cpu_name(), " ".join(cpu_flags())


def native_kernels_stamp() -> str:
    """The native CPU kernel library's source stamp when it is built and current (the kernels the
    measured variants then run), else "none" (the torch paths run)."""
    if not is_current():
        return "none"
    return library_path().with_suffix(".stamp").read_text().strip()


def machine_key(device: str) -> str:
    """sha256 of what the measurements depend on: device, CPU model and flags, threads, torch version,
    and the native kernels' source stamp (a profile measured with other kernels is not reused)."""
    name, flags = _cpu_identity()
    parts = [device, name, flags, str(torch.get_num_threads()), torch.__version__, str(PROFILE_VERSION),
             native_kernels_stamp()]
    if device == "cuda" and torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name())
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def profile_path(device: str) -> Path:
    return cache_dir() / "profiles" / f"{device}-{machine_key(device)}.json"


def machine_profile(device: str = "cpu", *, refresh: bool = False, variants: tuple[str, ...] = (),
                    progress: bool = False) -> MachineProfile:
    """The cached profile of this machine, or a new measurement (cached) when there is none, when it
    lacks one of `variants`, or with `refresh`."""
    path = profile_path(device)
    if path.is_file() and not refresh:
        try:
            prof = MachineProfile.from_dict(json.loads(path.read_text()))
            if all(v in prof.experts for v in variants):
                return prof
        except (json.JSONDecodeError, TypeError, KeyError):
            pass  # an old or damaged cache entry is measured again
    prof = measure(device, variants=variants, progress=progress)
    atomic_write_text(path, json.dumps(prof.to_dict(), indent=2) + "\n")
    return prof


# --- measurement ---

def median_time(fn: Any, repeats: int, device: torch.device) -> float:
    """The median wall time of `repeats` runs after one warm-up (module docstring: why not the least)."""
    call = timed(fn, device)
    call()
    return statistics.median(call() for _ in range(repeats))


def experts_module(variant: str, E: int, D: int, I: int, device: torch.device) -> Any:
    """An experts module of this variant ("bf16/<kernel>[+fp32]" or a quantize preset name), random
    weights: float ones drawn, a preset's codes, scales and zero-points drawn at its width and group
    size (`random_quantized_experts`)."""
    if not variant.startswith("bf16/"):
        return random_quantized_experts(variant, E, D, I).to(device)
    g = torch.Generator().manual_seed(0)
    # drawn in bf16: an expert of the cache's size needs no fp32 copy
    gate_up = torch.empty(E, 2 * I, D, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
    down = torch.empty(E, D, I, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
    kernel, _, extra = variant.removeprefix("bf16/").partition("+")
    ex = Experts(E, D, I)
    ex.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
    ex.down_proj = torch.nn.Parameter(down, requires_grad=False)
    ex = ex.to(device)
    use_kernel_(ex, kernel, fp32_weights=extra == "fp32")
    return ex


def random_quantized_experts(preset: str, E: int, D: int, I: int) -> QuantizedExperts:
    """E experts at quantize preset `preset` with random codes, scales of a ~0.02-wide weight and
    zero-points next to the midpoint (not all at it: the kernels then read them, as for quantized
    weights). The kernels' speed does not depend on the values; drawing float weights and quantizing
    them took 17 s for one Mixtral-8x7B layer's int4 experts on the Intel machine, this ~1 s."""
    q = layer_quantizer(preset)
    if q is None:
        raise ValueError(f"expert variant {preset!r} is not a quantize preset")
    g = torch.Generator().manual_seed(0)
    ex = QuantizedExperts([q.bits] * E, D, I, q.group_size)
    mid = float(1 << (q.bits - 1))
    for name, p in ex.named_parameters():
        if name.startswith("q"):
            p.data.random_(0, 256, generator=g)
        elif name.startswith("s"):
            p.data.uniform_(0.5, 1.5, generator=g).mul_(0.02 / mid)  # none exact in fp16 (read_scales)
        else:
            p.data.random_(0, 2, generator=g).add_(mid - 1)
    return ex


def _quantized_experts(preset: str, gate_up: torch.Tensor, down: torch.Tensor) -> QuantizedExperts:
    """Stacked float experts at quantize preset `preset`."""
    q = layer_quantizer(preset)
    if q is None:
        raise ValueError(f"expert variant {preset!r} is not a quantize preset")
    # hqq (and "auto", which picks hqq or rtn) store the same layout and run the same kernel: rtn is instant
    algorithm = "rtn" if q.algorithm in ("hqq", "auto") else q.algorithm
    return QuantizedExperts.from_float(gate_up, down, [q.bits] * gate_up.shape[0], group_size=q.group_size,
                                       algorithm=algorithm)


def stored_expert_bytes(variant: str, D: int, I: int, dtype_bytes: int = 2) -> float:
    """Bytes one expert's weights take in this variant (what decode streams): codes + fp32 scale and
    zero per group for a quantize preset, `dtype_bytes` per weight in floating point."""
    params = 3 * D * I
    if variant.startswith("bf16/"):
        return params * dtype_bytes
    q = layer_quantizer(variant)
    assert q is not None
    total = 0
    for rows, cols in ((2 * I, D), (D, I)):  # gate_up [2I, D], down [D, I]: codes, fp32 scale and zero per group
        total += rows * (packed_cols(cols, q.bits) + 8 * num_groups(cols, q.group_size))
    return total


def uniform_routing(N: int, K: int, E: int, device: torch.device) -> Any:
    """N tokens, each routed to K distinct experts of E drawn at random (seeded by N and K), equal weights."""
    g = torch.Generator().manual_seed(N * 31 + K)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)]).to(device)
    w = torch.full((N, K), 1.0 / K, device=device)
    return Routing(indices=idx, weights=w, logits=torch.zeros(N, E, device=device))


def streaming_shape(variant: str, llc_bytes: int, *, hidden: int = 2048, align: int = 128) -> tuple[int, int]:
    """(D, I) of an expert whose stored bytes in `variant` are at least `llc_bytes` (I a multiple of
    `align`): two of them read by one call cannot stay in the last-level cache."""
    per_block = stored_expert_bytes(variant, hidden, align)  # bytes per `align` inner columns
    blocks = max(1, -(-llc_bytes // int(per_block)))
    return hidden, blocks * align


def fit_prefill(small_s: float, large_s: float, *, small: tuple[int, int], large: tuple[int, int], tokens: int,
                top_k: int, experts: int, call_s: float, expert_fixed_s: float) -> tuple[float, float]:
    """Step 2, prefill: (flops_per_s, slot_s) from one call's time at two expert sizes (D, I) with the same
    `tokens` x `top_k` token-slots over `experts` experts (all active): the sizes differ in flops only,
    so their difference is the matmul rate and what the small size's time has left, beyond the call
    and the experts' fixed costs, is the per-token cost of the slots beyond each expert's first. Where
    noise swamps the difference (the large size not slower), all of the large size's time is flops."""
    flops = [6.0 * D * I * tokens * top_k for D, I in (small, large)]
    beyond = tokens * top_k - experts
    if large_s > small_s:
        rate = (flops[1] - flops[0]) / (large_s - small_s)
        return rate, max(0.0, (small_s - call_s - experts * expert_fixed_s - flops[0] / rate) / max(1, beyond))
    return flops[1] / max(large_s - call_s - experts * expert_fixed_s, 1e-9), 0.0


def measure_variant(variant: str, device: torch.device, *, small: tuple[int, int] = (128, 128),
                    large: tuple[int, int] = (768, 768), experts: int = 8, repeats: int = 5,
                    llc_bytes: int = 0) -> ExpertRate:
    """Step 2: fit call_s, expert_fixed_s, bytes_per_s and flops_per_s of one variant, and with
    `llc_bytes` (> 0) stream_bytes_per_s (`streamed_in_turn`; `measure` takes every variant's in one)."""
    modules: dict[tuple[int, int], Any] = {}

    def t(D: int, I: int, N: int, K: int, E: int = experts) -> float:
        if (D, I) not in modules:
            modules.clear()  # one size in memory at a time
            modules[(D, I)] = experts_module(variant, E, D, I, device)
        x = torch.randn(N, D, device=device).to(torch.bfloat16)
        routings = [uniform_routing(N, K, E, device) for _ in range(4)]
        return median_time(_experts_call(modules[(D, I)], x, routings, device), repeats, device)

    (Ds, Is), (Dl, Il) = small, large
    bs, bl = stored_expert_bytes(variant, Ds, Is), stored_expert_bytes(variant, Dl, Il)
    s1, s2 = t(Ds, Is, 1, 1), t(Ds, Is, 1, 2)
    l2 = t(Dl, Il, 1, 2)
    bw = 2 * (bl - bs) / max(l2 - s2, 1e-9)
    fixed = max(0.0, s2 - s1 - bs / bw)
    call = max(0.0, s1 - fixed - bs / bw)
    N = 64
    rate, slot = fit_prefill(t(Ds, Is, N, 2), t(Dl, Il, N, 2), small=small, large=large, tokens=N, top_k=2,
                             experts=experts, call_s=call, expert_fixed_s=fixed)
    modules.clear()
    fitted = ExpertRate(call_s=call, expert_fixed_s=fixed, bytes_per_s=bw, flops_per_s=rate, slot_s=slot)
    if llc_bytes > 0:
        (fitted,), _ = streamed_in_turn([(variant, fitted)], device, llc_bytes)
    return fitted


def _tiny_model(layers: int, device: torch.device) -> Any:
    hf = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": layers,
          "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "num_local_experts": 4,
          "num_experts_per_tok": 2, "vocab_size": 256, "max_position_embeddings": 64,
          "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    torch.manual_seed(0)
    model = MoEModel(parse_config(hf))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model = model.to(device=device, dtype=torch.bfloat16).eval()
    # frozen as a loaded checkpoint is (moeinfer.load): modules that take a prepared one-row call only
    # for grad-free weights (moeinfer.engine.cpu_decode) do so here too
    model.requires_grad_(False)
    use_planned_dense_(model, device)  # the dense path a planned model runs
    return model


def decode_gap_rounds(models: list[Any], rounds: int, tokens: int = 16,
                      count: Any = None) -> tuple[list[list[float]], list[float]]:
    """`rounds` rounds (after one warm-up round) in which each model in turn runs a greedy `generate` of
    `tokens` tokens through its KV cache (the step a decode runs, with the generation loop's own work,
    as benchmarks measure decode): per round, per model, the generation's mean time between consecutive
    tokens (`shape_costs.mean_step`: its decode tokens/s, what a user meets and the benchmark reports;
    until the seventeenth session the median step, which left out the generation's slow steps: the
    shipped model's int4 step, median 1.44 ms, mean 1.51).
    Returns (gaps [round][model], per_step): `count(model)` (optional) is a counter read at every
    token, per_step its mean change between consecutive tokens of the last round per model (e.g.
    expert loads per step; zeros without `count`)."""
    gaps_by_round: list[list[float]] = []
    per_step = [0.0] * len(models)
    for r in range(rounds + 1):  # round 0 warms up
        row = []
        for i, m in enumerate(models):
            stamps, counts = token_stamps(m, tokens, count)
            row.append(statistics.mean(step_changes(stamps)))
            if counts:
                per_step[i] = statistics.mean(step_changes(counts))
        if r:
            gaps_by_round.append(row)
    return gaps_by_round, per_step


def decode_gaps_in_turn(models: list[Any], repeats: int, tokens: int = 16,
                        count: Any = None) -> tuple[list[float], list[float]]:
    """Per model, its gap over `repeats` rounds of `decode_gap_rounds` (the models taking turns each
    round) priced against the first model's (its median round's gap x the median ratio:
    moeinfer/planning/in_turn.py), and its per_step."""
    rounds, per_step = decode_gap_rounds(models, repeats, tokens, count)
    return priced_by_reference(rounds), per_step


def measure_fixed(device: torch.device, rate: ExpertRate, top_k: int = 2, repeats: int = 7,
                  kernel: str = "reference") -> tuple[float, float]:
    """Step 3: (layer_fixed_s, step_fixed_s) from decode steps of 1- and 3-layer models with their
    experts on `kernel` (the kernel `rate` was measured for) — the time between tokens of a greedy
    generation through the KV cache (`decode_gaps_in_turn`), the models taking turns, each figure priced
    against the 1-layer model's in the same rounds, so a change of load on the machine touches both alike:
    the figure is their
    difference, less the expert stage `rate` prices. Where the native kernels run, `kernel` is 'cpu':
    its expert stage is small and priced closely, so the figure is the layer's own overhead. (Timing
    one-token forwards without a cache, with 'reference' experts whose standalone fit was most of the
    layer, had left a fifth of the shipped model's per-layer overhead and none of the generation
    loop's, predicting it 1.5-2x too fast.) On a machine whose cores are all busy it still moves: a
    profile is measured on an idle machine."""
    models = [_tiny_model(layers, device) for layers in (1, 3)]
    for m in models:
        use_kernel_(m, kernel)
    times, _ = decode_gaps_in_turn(models, repeats)
    per_layer = max(0.0, (times[1] - times[0]) / 2)
    experts_part = rate.call_s + top_k * rate.expert_fixed_s  # the tiny layer's own expert stage
    layer_fixed = max(0.0, per_layer - experts_part)
    step_fixed = max(0.0, times[0] - per_layer)
    return layer_fixed, step_fixed


def measure_prefill_tokens(device: torch.device, rate: ExpertRate, layer_fixed: float, top_k: int = 2,
                           repeats: int = 7, kernel: str = "reference", tokens: int = 64) -> float:
    """Step 3, prefill: `layer_token_s` from prefill forwards of `tokens` tokens of the 1- and 3-layer
    models (`prefill_in_turn`): per layer, their difference less the expert stage `rate` prices at
    that many tokens and less the one-token layer cost (`layer_fixed`, measured by `measure_fixed`),
    per token beyond the first. The small models' matmuls are negligible, so this is the host work a
    layer does per token."""
    models = [_tiny_model(layers, device) for layers in (1, 3)]
    for m in models:
        use_kernel_(m, kernel)
    times = prefill_in_turn(models, repeats, tokens)
    per_layer = max(0.0, (times[1] - times[0]) / 2)
    cfg = models[0].config
    E, D, inner = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    slots = tokens * top_k
    per_expert = slots // E  # the tiny models' routing spreads a prompt's tokens over every expert
    experts_part = rate.call_s + E * rate.expert_s(0.0, 6.0 * D * inner * per_expert, tokens=per_expert)
    return max(0.0, (per_layer - experts_part - layer_fixed) / (tokens - 1))


def _quantized_(model: Any, precision: str) -> None:
    """Every MoE layer of `model` at quantize preset `precision`."""
    for b in model.moe_blocks():
        ex = b.experts
        b.experts = _quantized_experts(precision, ex.gate_up_proj.data, ex.down_proj.data).to(ex.gate_up_proj.device)


def offload_host_settings(key: str) -> tuple[str, str | None]:
    """(precision, kernel) `measure_offload` measures an `offload_host` key with: "bf16/cpu" float
    experts on the 'cpu' kernel, "bf16" float ones on the default, a quantize preset itself."""
    return ("bf16", "cpu") if key == "bf16/cpu" else (key, None)


def measure_offload(device: torch.device, link_gbps: float, repeats: int = 9,
                    precision: str = "bf16", kernel: str | None = None, *,
                    base: Callable[[], Any] | None = None, expert_bytes: float | None = None) -> OffloadHost:
    """Step 4: the host costs of offloaded layers of a 3-layer random model (4 experts a layer, top-2;
    `base`: another model's maker, a fresh resident model with bf16 experts each call, and
    `expert_bytes` its expert's stored bytes at `precision`: the planned model's shape, moeinfer/planning/
    shape_profile.py step 5) with its experts at `precision` (bf16 or a quantize preset); offloaded quantized experts run
    kernel 'cpu' on a CPU, as `apply_plan_` sets it, float ones `kernel` (None: the default,
    'reference'), resident and offloaded alike. Each set of models in turn, each figure priced against
    the resident model's in the same rounds, so a change of load on the machine touches them alike.
    1. decode (layer_s, load_latency_s): resident, offloaded with a cache that holds every expert it
       uses (all hits), and with 2 slots (every expert of every layer a miss), timed as a decode runs
       (`decode_gaps_in_turn`: greedy generation through the KV cache, where a one-row CPU step runs the
       prepared program of moeinfer.engine.cpu_decode with the resident experts' prepared call and the
       offloaded experts called as their module), with a cache of every expert (L x E slots) and one
       of K slots (top-k: each layer's experts evict the last one's). (Timing one-token forwards
       without a cache compared the offloaded layer with an eager resident one, not with the prepared
       step a resident decode runs: the shipped model's offloaded plans measured 0.75-0.8x their
       prediction.)
    2. prompts (prompt_layer_s, prompt_load_s): `PROMPT_TOKENS`-token prompt forwards (every expert of
       every layer routed to) of the resident model, of one whose cache holds all L x E experts, and of
       one whose E global LRU slots hold one layer's (each visit loads all E, into slots). A prompt's
       visit reads back and books many rows, and its loads land while its experts compute: on the Intel
       machine the shipped model's 64-token prompt paid ~360 us a visit and ~170 us a load beyond
       resident (int8, 6 slots) where the decode figures priced ~130 and ~90."""
    tier = "disk" if device.type == "cpu" else "cpu"
    if base is None:
        def base() -> Any:
            return _tiny_model(3, device)
    # one expert of the random model (D = I = 64) as stored: bf16, or the preset's codes, scales and zeros
    nbytes = (stored_expert_bytes("bf16/reference" if precision == "bf16" else precision, 64, 64)
              if expert_bytes is None else expert_bytes)
    with tempfile.TemporaryDirectory(prefix="moeinfer-profile-") as tmp:
        def model(cache: int | None, name: str) -> Any:
            m = base()
            if precision != "bf16":
                _quantized_(m, precision)
            elif kernel is not None:
                use_kernel_(m, kernel)
            if cache is not None:
                offload_(m, OffloadConfig(tier=tier, cache=cache, scope="global", policy="lru",
                                          offload_dir=f"{tmp}/{name}"))
                if precision != "bf16" and device.type == "cpu":
                    use_kernel_(m, "cpu")
                elif kernel is not None:
                    use_kernel_(m, kernel)
            return m

        def loads(m: Any) -> float:
            off = getattr(m, "offload", None)
            return float(off.cache.stats.demand_loads) if off is not None else 0.0
        # 1. decode
        models = [model(None, "resident")]
        cfg = models[0].config
        layers, E, K = len(models[0].moe_blocks()), cfg.num_experts, cfg.top_k
        models += [model(layers * E, "hits"), model(K, "misses")]
        (resident, hits, misses), (_, _, per_step) = decode_gaps_in_turn(models, repeats, count=loads)
        # 2. prompts (the resident model again; E slots: one layer's experts)
        models[1:] = [model(layers * E, "prompt-hits"), model(E, "prompt-misses")]
        (p_resident, p_hits, p_misses), p_loads = prompt_loads_in_turn(models, repeats, loads)
        for m in models[1:]:
            m.offload.close()
    per_load = (misses - hits) / per_step if per_step else 0.0
    p_per_load = (p_misses - p_hits) / p_loads if p_loads else 0.0
    return OffloadHost(layer_s=max(0.0, (hits - resident) / layers),
                       load_latency_s=max(0.0, per_load - nbytes / (link_gbps * 1e9)),
                       prompt_layer_s=max(0.0, (p_hits - p_resident) / layers),
                       prompt_load_s=max(0.0, p_per_load - nbytes / (link_gbps * 1e9)))


def prompt_loads_in_turn(models: list[Any], repeats: int, count: Any,
                         tokens: int = PROMPT_TOKENS) -> tuple[list[float], float]:
    """Per model, a prompt forward of `tokens` tokens through a KV cache, the models in turn for `repeats`
    rounds, priced against the first's (moeinfer/planning/in_turn.py); and the last model's median
    change of `count(model)` over one forward (its loads per prompt)."""
    ids = prompt_ids(tokens)
    per_forward: list[float] = []

    def counted(m: Any, last: bool) -> Any:
        def call() -> float:
            before = count(m)
            t = prefill_seconds(m, ids)
            if last:
                per_forward.append(count(m) - before)
            return t
        return call
    rounds = rounds_in_turn([counted(m, i == len(models) - 1) for i, m in enumerate(models)], repeats)
    return priced_by_reference(rounds), statistics.median(per_forward)


def host_rates() -> tuple[float, float]:
    """(memory read GB/s, fp32 GFLOP/s) of the host CPU (about a second: the planner benchmark takes it
    again beside each budget's timings, to show how far the machine drifted from its profile)."""
    src = torch.ones(64 << 20)  # 256 MiB fp32
    read = median_time(lambda: src.sum(), 5, torch.device("cpu"))
    a = torch.randn(1024, 1024)
    mm = median_time(lambda: a @ a, 3, torch.device("cpu"))
    return src.numel() * 4 / read / 1e9, 2 * 1024**3 / mm / 1e9


def _link_gbps(device: torch.device) -> tuple[str, float, float, float]:
    """(link kind, link GB/s, memory read GB/s, fp32 GFLOP/s) of the device."""
    if device.type == "cuda":
        n = 256 << 20
        host = torch.empty(n, dtype=torch.uint8).pin_memory()
        dev = torch.empty(n, dtype=torch.uint8, device=device)
        h2d = median_time(lambda: dev.copy_(host, non_blocking=True), 5, device)
        src = torch.ones(n // 4, device=device)
        read = median_time(lambda: src.sum(), 5, device)
        a = torch.randn(4096, 4096, device=device)
        mm = median_time(lambda: a @ a, 5, device)
        return "host", n / h2d / 1e9, n / read / 1e9, 2 * 4096**3 / mm / 1e9
    hw = calibrate(mib=64, repeats=3)
    read_gbps, _ = host_rates()
    return "disk", hw.link_gbps, read_gbps, hw.cpu_gflops


def _planned_linear(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Any:
    """A bias-free linear [cols -> rows] in `dtype` (random weight) on the planned dense path."""
    lin = torch.nn.Linear(cols, rows, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
    use_planned_dense_(lin, device)
    return lin


def _dense_gflops(device: torch.device) -> dict[str, float]:
    """GFLOP/s of a prefill-sized linear ([64, 1024] x [1024, 4096]) in each of DENSE_DTYPES, on the
    planned dense path."""
    out = {}
    for name in DENSE_DTYPES:
        dt = getattr(torch, name)
        x = torch.randn(64, 1024, device=device).to(dt)
        lin = _planned_linear(4096, 1024, dt, device)
        with torch.inference_mode():
            s = median_time(lambda: lin(x), 3, device)
        out[name] = 2 * 64 * 1024 * 4096 / s / 1e9
    return out


STREAM_BYTES = 256 << 20  # what a streamed-weight measurement reads per call, at the least
STREAM_ROUNDS = 7  # streamed_in_turn's rounds per variant (after a warm-up round)
READ_SHARE = 4  # _read_overlap's read: this share of its expert call's bytes


def streamed_bytes(llc_bytes: int) -> int:
    """Bytes a measurement of weights streamed from memory reads per call: 8x the last-level cache that
    sysfs reports and at least STREAM_BYTES. A VM's two cores can sit on two of a server CPU's cache
    dies, each with the L3 sysfs reports: a read of twice that (the profile until version 10) partly
    stayed cached and measured 8-42 GB/s on a 21-24 GB/s machine from one profile to the next."""
    return max(8 * llc_bytes, STREAM_BYTES)


def _dense_read_call(device: torch.device, llc_bytes: int, cols: int = 4096) -> tuple[Callable[[], float], int]:
    """(a timed one-token bf16 linear on the planned dense path whose weight is `streamed_bytes`: a decode
    token's attention and LM head read from memory, its weight's bytes)."""
    rows = -(-streamed_bytes(llc_bytes) // (2 * cols))
    lin = _planned_linear(rows, cols, torch.bfloat16, device)
    x = torch.randn(1, cols, device=device).to(torch.bfloat16)

    def call() -> None:
        with torch.inference_mode():
            lin(x)
    return timed(call, device), rows * cols * 2


def _experts_call(mod: Any, x: torch.Tensor, routings: list[Routing], device: torch.device) -> Callable[[], None]:
    """A call of the experts module `mod` on x [N, D], each call the next of `routings`; one token as a
    one-row decode runs it: the prepared call where the module has one (moeinfer.engine.cpu_decode),
    else the module."""
    make = getattr(mod, "decode_op", None) if x.shape[0] == 1 and device.type == "cpu" else None
    op = make() if make is not None else None
    i = [0]

    def call() -> None:
        i[0] = (i[0] + 1) % len(routings)
        r = routings[i[0]]
        with torch.inference_mode():
            if op is not None:
                op(x, r.indices, r.weights)
            else:
                mod(x, r)
    return call


def _streamed_experts_call(variant: str, device: torch.device, llc_bytes: int) -> tuple[Callable[[], float], float]:
    """(a timed one-token decode call of two experts of `variant` of `streaming_shape`, top-2 of 2: the two
    `streamed_bytes` together, none stays cached; their stored bytes)."""
    D, I = streaming_shape(variant, streamed_bytes(llc_bytes) // 2)
    mod = experts_module(variant, 2, D, I, device)
    x = torch.randn(1, D, device=device).to(torch.bfloat16)
    call = _experts_call(mod, x, [uniform_routing(1, 2, 2, device)], device)
    return timed(call, device), 2 * stored_expert_bytes(variant, D, I)


def streamed_in_turn(rates: Sequence[tuple[str, ExpertRate]], device: torch.device, llc_bytes: int,
                     rounds: int = STREAM_ROUNDS) -> tuple[list[ExpertRate], float]:
    """Steps 1-2's rates of weights streamed from memory, on one level: per variant, `rounds` rounds of its
    streamed decode call (`_streamed_experts_call`) in turn with the dense read (`_dense_read_call`), one
    variant's weights in memory at a time, all priced against the dense read's median over every round
    (moeinfer/planning/in_turn.py). Returns (the rates with their stream_bytes_per_s, the dense read's
    GB/s: `dense_read_gbps`). Until profile version 17 each was the median of a few calls of its own, one
    variant after another, and a drifting VM gave them different phases: on the Intel machine one profile
    read int4 at 12.8 GB/s and int8 at 22.1, where in turn they read 24.3 and 26.6 (bf16/cpu 29.5), and a
    Mixtral-8x7B-shaped plan at int8 measured 0.73-0.76x its prediction (docs/planner.md, nineteenth
    session)."""
    reference, ref_bytes = _dense_read_call(device, llc_bytes)
    sets, nbytes = [], []
    for v, _ in rates:
        call, n = _streamed_experts_call(v, device, llc_bytes)
        sets.append(rounds_in_turn([reference, call], rounds))
        nbytes.append(n)
        del call  # its weights, before the next variant's are drawn
    priced, price = priced_by_shared_reference(sets)
    out = [replace(r, stream_bytes_per_s=n / max(times[1] - r.call_s - 2 * r.expert_fixed_s, 1e-9))
           for (_, r), n, times in zip(rates, nbytes, priced)]
    return out, ref_bytes / price / 1e9


def _read_overlap(device: torch.device, llc_bytes: int, variant: str) -> float:
    """`read_overlap` of an expert call (two experts of `streaming_shape`, decode of one token) of
    `variant` and a read of `1 / READ_SHARE` of its bytes: what a miss's read does beside the compute a
    decode step runs meanwhile (the layer's other experts, the next layers' dense parts, the head: several
    experts' bytes). Until profile version 18 the read had the call's bytes: one core's page-cache copy
    (~6 GB/s) then outlasted the call (~25 GB/s), which hid behind it, and the profile read 0.64-1.0 on
    the Intel machine; a read a quarter of the call's size hid 0.0-0.02 there, and an int4 Mixtral-8x7B
    plan's decode step took its loads' whole time on top of its compute (~15.5 ms a 92 MB read, its
    step 20 ms longer with ~1.1 loads a step, the loader's wait 5-6 ms of it: the read takes a core from
    the two-thread compute; docs/planner.md, nineteenth session)."""
    D, I = streaming_shape(variant, llc_bytes)
    mod = experts_module(variant, 2, D, I, device)
    x = torch.randn(1, D, device=device).to(torch.bfloat16)
    routing = uniform_routing(1, 2, 2, device)

    def compute() -> None:
        with torch.inference_mode():
            mod(x, routing)
    return read_overlap(compute, nbytes=int(2 * stored_expert_bytes(variant, D, I)) // READ_SHARE)


def cache_bytes(device: torch.device) -> int:
    """The last-level cache of `device`: the CPU's (sysfs), or a GPU's L2."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or (64 << 20)
    return last_level_cache_bytes()


def default_variants(device: str, precisions: tuple[str, ...] = ("int8", "int4")) -> tuple[str, ...]:
    """The variants the search may choose on `device`: bf16 with each usable kernel, then the presets."""
    out = ["bf16/reference"]
    for k in (("cpu",) if device == "cpu" else ("triton",)):
        try:
            resolve(k, device)
        except KernelUnavailableError:
            continue
        out.append(f"bf16/{k}")
        if device == "cpu":
            out.append(f"bf16/{k}+fp32")
    return tuple(out) + tuple(precisions)


def measure(device: str = "cpu", *, variants: tuple[str, ...] = (), progress: bool = False) -> MachineProfile:
    """Measure this machine (steps 1-4 of the module docstring)."""
    dev = torch.device(device)
    t0 = time.time()
    link, link_gbps, read_gbps, gflops = _link_gbps(dev)
    cached_gbps = cached_read_gbps() if dev.type == "cpu" else None
    wanted = tuple(dict.fromkeys(default_variants(device) + tuple(variants)))
    llc = cache_bytes(dev)
    rates = {}
    for v in wanted:
        if progress:
            print(f"measuring expert variant {v} ...", flush=True)
        rates[v] = measure_variant(v, dev)
    fixed_kernel = "cpu" if "bf16/cpu" in rates and native_dense(dev) else "reference"
    layer_fixed, step_fixed = measure_fixed(dev, rates[f"bf16/{fixed_kernel}"], kernel=fixed_kernel)
    layer_token = measure_prefill_tokens(dev, rates[f"bf16/{fixed_kernel}"], layer_fixed, kernel=fixed_kernel)
    dense = _dense_gflops(dev)
    if progress:
        print("measuring weights streamed from memory, every variant in turn with the dense read ...", flush=True)
    streamed, dense_read = streamed_in_turn(list(rates.items()), dev, llc)
    rates = dict(zip(rates, streamed))
    overlap = None
    if dev.type == "cpu":
        overlap = _read_overlap(dev, llc, "bf16/cpu" if "bf16/cpu" in rates else "bf16/reference")
    float_host = measure_offload(dev, link_gbps)
    offload_host = {"bf16": float_host}
    # offloaded quantized layers, on a CPU (on CUDA, not measured on a GPU yet: the float figures serve)
    for v in wanted if dev.type == "cpu" else ():
        if not v.startswith("bf16/"):  # a quantize preset
            if progress:
                print(f"measuring offloaded {v} experts ...", flush=True)
            offload_host[v] = measure_offload(dev, link_gbps, precision=v)
    if "bf16/cpu" in rates:  # offloaded float experts on the CPU kernel, one call per cached expert
        offload_host["bf16/cpu"] = measure_offload(dev, link_gbps, kernel="cpu")
    host = host_rates() if dev.type == "cuda" else (None, None)
    name, _ = _cpu_identity()
    return MachineProfile(key=machine_key(device), device=device, cpu=name, threads=torch.get_num_threads(),
                          torch_version=torch.__version__, link=link, link_gbps=link_gbps, mem_read_gbps=read_gbps,
                          matmul_gflops=gflops, layer_fixed_s=layer_fixed, step_fixed_s=step_fixed, experts=rates,
                          layer_token_s=layer_token,
                          host_mem_gbps=host[0], host_gflops=host[1], dense_gflops=dense,
                          offload_layer_s=float_host.layer_s, load_latency_s=float_host.load_latency_s,
                          offload_host=offload_host,
                          cached_link_gbps=cached_gbps, llc_bytes=llc, dense_read_gbps=dense_read,
                          read_overlap=overlap,
                          measured=f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, {time.time() - t0:.1f} s, "
                                   f"load average {os.getloadavg()[0]:.2f}")

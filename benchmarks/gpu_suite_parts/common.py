"""What the parts of the GPU suite share: the part registry, the context a part runs in, and the
random models built without a checkpoint.

Shapes: E experts, D hidden, I expert inner size.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeinfer.fsutil import atomic_write_text

Result = dict[str, Any]


@dataclass(frozen=True)
class Part:
    """One step of the suite: `run(ctx)` returns its result; `share_s` is its slice of a 480 s budget."""

    name: str
    letter: str
    title: str
    share_s: float
    run: Callable[[Context], Result]
    markdown: Callable[[Result], str]


PARTS: dict[str, Part] = {}


def part(name: str, *, letter: str, title: str, share_s: float,
         markdown: Callable[[Result], str]) -> Callable[[Callable[[Context], Result]], Callable[[Context], Result]]:
    """Decorator: register `run` as part `name` (the suite runs them in registration order)."""

    def wrap(run: Callable[[Context], Result]) -> Callable[[Context], Result]:
        if name in PARTS:
            raise ValueError(f"GPU suite part {name!r} is already registered")
        PARTS[name] = Part(name, letter, title, share_s, run, markdown)
        return run

    return wrap


@dataclass
class Context:
    """Where and how a part runs.

    dry_run: CPU, tiny shapes, Triton's interpreter; the GPU path's code with CPU stand-ins for the
      CUDA-only pieces (events, pinned memory, graphs). No number of a dry run is a GPU measurement.
    deadline: time.time() by which the part must have returned (the suite kills it then).
    limits: the env part's measured limits (copy_bytes_s, h2d_bytes_s, matmul_flops, cpu_...), or {}.
    scratch: a folder for the part's working files (kept out of `out_dir`, which gets two files).
    partial: the file a part saves what it has finished so far to (`save`): a part killed at its
      deadline keeps those rows.
    """

    dry_run: bool
    device: str
    out_dir: Path
    deadline: float
    traces: Path
    repo: Path
    scratch: Path
    limits: dict[str, Any] = field(default_factory=dict)
    partial: Path | None = None

    def time_left(self) -> float:
        return self.deadline - time.time()

    def save(self, result: Result) -> None:
        if self.partial is not None:
            write_json(self.partial, result)

    def torch_device(self) -> Any:
        import torch

        return torch.device(self.device)

    def tmp_dir(self, need_bytes: int = 0) -> str | None:
        """A folder in RAM with `need_bytes` free, for checkpoints that exist only to be read back (no
        disk write); None (the default temp folder) where there is none."""
        import shutil

        shm = Path("/dev/shm")
        if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 1.2 * need_bytes:
            return str(shm)
        return None


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=str) + "\n")


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), seconds) for set-up steps, whose cost the suite reports (not a benchmark timing)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# --------------------------------------------------------------------------- random models

MIXTRAL_8X7B = {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
                "num_experts_per_tok": 2, "vocab_size": 32000, "max_position_embeddings": 4096,
                "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False}
OLMOE_1B_7B = {"model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024, "num_hidden_layers": 16,
               "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 64, "num_experts_per_tok": 8,
               "vocab_size": 50304, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
               "tie_word_embeddings": False}


def _register_host(t: Any) -> None:
    """Page-lock `t`'s host memory in place (cudaHostRegister): pinned at its exact size, where
    torch's caching host allocator would round a 1.9 GB request up to 2 GiB. No fallback to a pinned
    copy: for Mixtral's 90 GB of experts a second copy would not fit in host memory."""
    import torch

    err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 1))  # portable
    if err != 0 or not t.is_pinned():
        raise RuntimeError(f"page-locking {t.numel() * t.element_size():,} bytes of host memory for experts failed "
                           f"(cudaHostRegister error {err}, is_pinned {t.is_pinned()})")


def random_model(hf: dict[str, Any], *, device: Any, dtype: Any, experts_on_host: bool = False,
                 pin: bool = False, seed: int = 0, threads: int = 8) -> Any:
    """A MoEModel of config `hf` with random weights made where they will live, no checkpoint:
    1. parameters are created on the meta device (moeinfer.loading.checkpoint.meta_parameters);
    2. the experts' stacked tensors are made on `device`, or in host memory when `experts_on_host`
       (page-locked in place when `pin`, several layers at once), filled from a random generator
       on `device` (a GPU fills and copies them far faster than the CPU draws them);
    3. everything else is made on `device`: matrices N(0, 0.02), vectors (norms) ones, and the
       buffers (RoPE tables) moved there.
    """
    import torch

    from moeinfer.arch import parse_config
    from moeinfer.loading.checkpoint import meta_parameters
    from moeinfer.model.transformer import MoEModel

    device = torch.device(device)
    with meta_parameters():  # 1.
        model = MoEModel(parse_config(hf))
    g = torch.Generator(device=device).manual_seed(seed)
    blocks = model.moe_blocks()
    where = torch.device("cpu") if experts_on_host else device

    def make(shape: tuple[int, ...], fan_in: int) -> Any:
        t = torch.empty(shape, dtype=dtype, device=where)
        if pin and where.type == "cpu":
            _register_host(t)
        for e in range(shape[0]):  # one expert at a time: a small staging tensor on `device`
            t[e].copy_(torch.randn(shape[1:], generator=g, device=device, dtype=dtype) / fan_in**0.5)
        return t

    def layer(b: Any) -> None:  # 2.
        E, two_i, D = b.experts.gate_up_proj.shape
        b.experts.gate_up_proj = torch.nn.Parameter(make((E, two_i, D), D), requires_grad=False)
        b.experts.down_proj = torch.nn.Parameter(make((E, D, two_i // 2), two_i // 2), requires_grad=False)

    if experts_on_host and len(blocks) > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:  # page faults and pinning in parallel
            list(pool.map(layer, blocks))
    else:
        for b in blocks:
            layer(b)
    with torch.no_grad():  # 3.
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is None or p.device.type != "meta":
                    continue
                t = torch.empty(p.shape, dtype=dtype, device=device)
                if t.dim() > 1:
                    t.normal_(0.0, 0.02, generator=g)
                else:
                    t.fill_(1.0)
                module._parameters[name] = torch.nn.Parameter(t, requires_grad=False)
            for name, buf in list(module._buffers.items()):
                if buf is not None:
                    module._buffers[name] = buf.to(device)
    return model.eval()

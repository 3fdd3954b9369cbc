"""Preallocated KV cache with a fill length per row.

Shapes: B batch rows, T new tokens, S cache slots (max length), Hkv key/value heads, Dh head dim,
C latent dim and R rotary dim (MLA).

Each row has its own length, so rows can hold sequences at different stages: a left-padded batch
from `generate` (all rows write the same slots; `valid[b, s]` marks padding) or the running requests
of continuous batching (each row writes at its own length). `rows(i, j)` is a view of some rows
sharing the storage, so a forward can work on part of the cache; `move_row`/`clear_row` let a
scheduler keep its running rows contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeinfer.config import ModelConfig


@dataclass
class CacheStep:
    """Where one forward's T new tokens go: row b writes slots starts[b] .. starts[b] + T - 1."""

    q_slots: torch.Tensor  # [B, T] slot of each new token (may be a broadcast view: read it, never write it)
    uniform_start: int | None  # the common start when every row starts at the same slot
    end: int  # 1 + the last slot written in any row: attention reads slots [0, end)


@dataclass
class LayerKV:
    """One layer's cache: (k, v) [B, Hkv, S, Dh] for GQA (seq_dim 2); (latent [B, S, C],
    k_rope [B, S, R]) for MLA (seq_dim 1)."""

    a: torch.Tensor
    b: torch.Tensor
    seq_dim: int

    def write(self, step: CacheStep, a_new: torch.Tensor, b_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens (laid out like the cache, T along seq_dim); return slots [0, end)."""
        if step.uniform_start is not None:
            s = step.uniform_start
            sl = (slice(None),) * self.seq_dim + (slice(s, s + a_new.shape[self.seq_dim]),)
            self.a[sl] = a_new
            self.b[sl] = b_new
        else:
            rows = torch.arange(self.a.shape[0], device=self.a.device)[:, None]  # [B, 1]
            if self.seq_dim == 2:  # [B, H, T, D] -> indexed as [B, T, H, D]
                self.a[rows, :, step.q_slots] = a_new.transpose(1, 2)
                self.b[rows, :, step.q_slots] = b_new.transpose(1, 2)
            else:
                self.a[rows, step.q_slots] = a_new
                self.b[rows, step.q_slots] = b_new
        upto = (slice(None),) * self.seq_dim + (slice(0, step.end),)
        return self.a[upto], self.b[upto]


def cache_bytes(config: ModelConfig, *, batch_size: int, max_length: int, dtype: torch.dtype) -> int:
    """Bytes a KVCache of this shape allocates (keys/values or MLA latents, plus the validity mask)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if config.attention == "mla" and config.mla is not None:
        per_token = config.mla.kv_lora_rank + config.mla.qk_rope_head_dim
    else:
        per_token = 2 * config.num_kv_heads * config.head_dim
    return batch_size * max_length * (config.num_layers * per_token * itemsize + 1)


def free_bytes(device: torch.device | str) -> int | None:
    """Memory free for new allocations on `device` (MemAvailable on CPUs), or None when unknown."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    if dev.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class KVCache:
    """Static-shape cache for `batch_size` rows of up to `max_length` tokens each."""

    def __init__(self, config: ModelConfig, *, batch_size: int, max_length: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if max_length < 1 or batch_size < 1:
            raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size}, {max_length}")
        need = cache_bytes(config, batch_size=batch_size, max_length=max_length, dtype=dtype)
        free = free_bytes(device)
        if free is not None and need > free:
            raise ValueError(f"a KV cache of {batch_size} rows x {max_length:,} tokens needs {need / 2**30:,.1f} GiB, "
                             f"more than the {free / 2**30:,.1f} GiB free on {torch.device(device)}: ask for a "
                             "shorter context (serve --max-model-len) or fewer rows (--max-batch)")
        self.max_length = max_length
        self.valid = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long)  # on the host: read without a device sync
        self.layers: list[LayerKV] = []
        for _ in range(config.num_layers):
            if config.attention == "mla":
                assert config.mla is not None
                a = torch.zeros(batch_size, max_length, config.mla.kv_lora_rank, device=device, dtype=dtype)
                b = torch.zeros(batch_size, max_length, config.mla.qk_rope_head_dim, device=device, dtype=dtype)
                self.layers.append(LayerKV(a, b, seq_dim=1))
            else:
                shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)
                self.layers.append(LayerKV(torch.zeros(shape, device=device, dtype=dtype),
                                           torch.zeros(shape, device=device, dtype=dtype), seq_dim=2))

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def length(self) -> int:
        """The longest row's length."""
        return int(self.lengths.max())

    def begin(self, new_valid: torch.Tensor) -> CacheStep:
        """Reserve slots for new tokens new_valid [B, T] (False = padding) and mark them."""
        B, T = new_valid.shape
        starts = self.lengths.tolist()  # read on the host, in plain Python (a decode step's hot path)
        end = max(starts) + T
        if end > self.max_length:
            raise ValueError(f"KV cache overflow: {end} tokens > max_length={self.max_length}")
        device = self.valid.device
        uniform = starts[0] if all(s == starts[0] for s in starts) else None
        if uniform is not None:
            q_slots = torch.arange(uniform, uniform + T, device=device).expand(B, T)  # [B, T]
            self.valid[:, uniform:uniform + T] = new_valid
        else:
            q_slots = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)[None]
            self.valid[torch.arange(B, device=device)[:, None], q_slots] = new_valid
        self.lengths += T
        return CacheStep(q_slots=q_slots, uniform_start=uniform, end=end)

    def rows(self, start: int, stop: int) -> KVCache:
        """A view of rows [start, stop) sharing this cache's storage (and lengths)."""
        view = object.__new__(KVCache)
        view.max_length = self.max_length
        view.valid = self.valid[start:stop]
        view.lengths = self.lengths[start:stop]
        view.layers = [LayerKV(kv.a[start:stop], kv.b[start:stop], kv.seq_dim) for kv in self.layers]
        return view

    def move_row(self, src: int, dst: int) -> None:
        """Copy row src (its keys, values, validity and length) into row dst."""
        if src == dst:
            return
        n = int(self.lengths[src])
        for kv in self.layers:
            sl = (slice(0, n),) if kv.seq_dim == 1 else (slice(None), slice(0, n))
            kv.a[(dst, *sl)] = kv.a[(src, *sl)]
            kv.b[(dst, *sl)] = kv.b[(src, *sl)]
        self.valid[dst] = self.valid[src]
        self.lengths[dst] = n

    def clear_row(self, row: int) -> None:
        self.valid[row] = False
        self.lengths[row] = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.a, layer.b))

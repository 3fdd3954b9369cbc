"""Model configuration: one typed description shared by every supported MoE architecture.

Each architecture adapter in `moeinfer.arch` turns a checkpoint's `config.json` into a
`ModelConfig`; the model in `moeinfer.model` is built from it alone and never looks at the raw
JSON. The raw dict is kept (`hf_config`) so that `moeinfer.save` writes back what was read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

ScoreFunc = Literal["softmax", "sigmoid"]
AttentionKind = Literal["gqa", "mla"]
QKNorm = Literal["none", "head", "full"]
LayerFFN = Literal["moe", "dense"]

ROPE_TYPES = ("default", "linear", "yarn")


class ConfigError(ValueError):
    """A config.json field has a value moeinfer does not handle."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding (Su et al., 2021), with the scalings checkpoints use.

    `interleaved` selects DeepSeek's layout, in which rotated pairs are (x0, x1), (x2, x3), ...;
    otherwise pairs are (x_i, x_{i+d/2}) as in Llama/Mixtral ("rotate half").
    """

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    interleaved: bool = False
    # YaRN (Peng et al., 2023) parameters; unused by other types.
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.type not in ROPE_TYPES:
            raise ConfigError(
                f"rope type {self.type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
            )
        if self.theta <= 0:
            raise ConfigError(f"rope theta must be > 0, got {self.theta}")


@dataclass(frozen=True)
class RouterConfig:
    """How a token's experts and their weights are chosen.

    1. score every expert: softmax (Mixtral, Qwen, OLMoE, DeepSeek-V2) or sigmoid (DeepSeek-V3);
    2. optionally restrict to the best `topk_group` of `n_group` expert groups (DeepSeek);
    3. take the top-k, choosing with `score + correction_bias` when the model has that bias;
    4. optionally renormalise the k weights to sum to one, then multiply by `scaling`.
    """

    num_experts: int
    top_k: int
    score_func: ScoreFunc = "softmax"
    norm_topk_prob: bool = True
    scaling: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: Literal["max", "top2_sum"] = "max"
    correction_bias: bool = False

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ConfigError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(
                f"top_k (num_experts_per_tok) must be in 1..{self.num_experts}, got {self.top_k}"
            )
        if self.num_experts % self.n_group:
            raise ConfigError(f"num_experts={self.num_experts} is not divisible by n_group={self.n_group}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ConfigError(f"topk_group must be in 1..n_group={self.n_group}, got {self.topk_group}")


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2, 2024): low-rank joint KV compression."""

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    """Everything the eager model needs; built by an architecture adapter from config.json."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense FFN inner size (dense layers)
    moe_intermediate_size: int  # inner size of one routed expert
    router: RouterConfig
    layer_ffn: tuple[LayerFFN, ...]
    rope: RopeConfig = field(default_factory=RopeConfig)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention: AttentionKind = "gqa"
    mla: MLAConfig | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: QKNorm = "none"
    clip_qkv: float | None = None
    sliding_window: tuple[int | None, ...] | None = None  # per layer; None = full attention
    shared_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # sigmoid gate on the shared expert (Qwen2-MoE)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if len(self.layer_ffn) != self.num_layers:
            raise ConfigError(f"layer_ffn has {len(self.layer_ffn)} entries for {self.num_layers} layers")
        if self.attention == "mla" and self.mla is None:
            raise ConfigError("attention='mla' needs an MLAConfig")
        rotary = self.mla.qk_rope_head_dim if self.mla is not None else self.head_dim
        if rotary % 2:
            raise ConfigError(f"the rotary head dim must be even, got {rotary}")
        if self.sliding_window is not None and len(self.sliding_window) != self.num_layers:
            raise ConfigError("sliding_window must give one entry per layer")

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.layer_ffn) if kind == "moe"]

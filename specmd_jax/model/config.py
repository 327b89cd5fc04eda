"""Architecture of a decoder-only MoE transformer, as data.

Every architectural difference between the supported model families is a field of `ModelConfig`;
layers never branch on a model name. `PRESETS` contains the published shapes of a few models.
"""

from __future__ import annotations

import dataclasses
from typing import Any

QK_NORM_MODES = ("none", "full", "per_head")
"""Modes of query and key RMS normalisation before RoPE: none, over the whole projection
(OLMoE: one weight of size heads x head_dim), or per head (Qwen3: one weight of size head_dim)."""

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and options of a decoder-only MoE transformer.

    Every layer is pre-norm: x + attention(norm(x)), then x + mlp(norm(x)), where mlp is a routed
    MoE block except in `dense_layers`. Experts and dense MLPs are SwiGLU: down(silu(gate(x)) * up(x)).
    The router is a bias-free linear map to `num_experts` logits followed by a softmax.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    expert_hidden_size: int  # intermediate size of one routed expert
    norm_topk_prob: bool = False  # renormalise the top-k softmax weights to sum to 1 (Mixtral, Qwen3)
    qk_norm: str = "none"  # one of QK_NORM_MODES
    clip_qkv: float | None = None  # clamp q, k and v projections to [-clip, clip] (OLMoE option)
    attention_bias: bool = False  # bias on the q, k and v projections (Qwen1.5/Qwen2-MoE)
    shared_expert_hidden_size: int = 0  # intermediate size of an always-on SwiGLU MLP; 0 = none
    shared_expert_gate: bool = False  # scale the shared MLP by sigmoid(linear(x)) (Qwen2-MoE)
    dense_layers: tuple[int, ...] = ()  # layers whose MLP is dense instead of routed
    dense_hidden_size: int = 0  # intermediate size of the dense MLP in `dense_layers`
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False  # output projection = transposed input embedding
    max_seq_len: int = 4096  # maximum sequence length; the default KV cache size
    dtype: str = "float32"  # dtype of parameters and activations; one of DTYPES
    name: str = "custom"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the layers with a routed MoE block, in execution order."""
        return tuple(i for i in range(self.num_layers) if i not in self.dense_layers)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Raise `ValueError` naming the first field whose value cannot build a model."""
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "num_experts", "top_k", "expert_hidden_size", "max_seq_len")
        for field in positive:
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{field}: expected a positive integer, got {value!r}")

        if self.top_k > self.num_experts:
            raise ValueError(f"ModelConfig.top_k: expected at most num_experts={self.num_experts}, got {self.top_k}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_kv_heads: expected a divisor of num_heads={self.num_heads}, got {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim: expected an even number (RoPE rotates pairs), got {self.head_dim}")
        if self.qk_norm not in QK_NORM_MODES:
            raise ValueError(f"ModelConfig.qk_norm: expected one of {QK_NORM_MODES}, got {self.qk_norm!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"ModelConfig.dtype: expected one of {DTYPES}, got {self.dtype!r}")

        bad_layers = [i for i in self.dense_layers if not 0 <= i < self.num_layers]
        if bad_layers:
            raise ValueError(f"ModelConfig.dense_layers: expected indices in [0, {self.num_layers}), got {bad_layers}")
        if not self.moe_layers:
            raise ValueError("ModelConfig.dense_layers: expected at least one MoE layer, got every layer dense")
        if self.dense_layers and self.dense_hidden_size < 1:
            raise ValueError(
                f"ModelConfig.dense_hidden_size: expected a positive size when dense_layers is set, got {self.dense_hidden_size}"
            )
        if self.shared_expert_gate and self.shared_expert_hidden_size < 1:
            raise ValueError("ModelConfig.shared_expert_gate: set shared_expert_hidden_size > 0 to gate a shared expert")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["dense_layers"] = list(self.dense_layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {unknown}; expected only {sorted(names)}")
        values = dict(data)
        if "dense_layers" in values:
            values["dense_layers"] = tuple(values["dense_layers"])
        return cls(**values)


# Published shapes. The numbers come from each model's config.json on its model card
# (OLMoE-1B-7B-0924, Mixtral-8x7B-v0.1, Qwen1.5-MoE-A2.7B, Qwen3-30B-A3B).
# NOTE: Mixtral-8x7B-v0.1 ships sliding_window=null, so full causal attention is exact for it;
# this model has no sliding-window attention at all.
PRESETS: dict[str, ModelConfig] = {
    "olmoe-1b-7b": ModelConfig(
        name="olmoe-1b-7b", vocab_size=50304, hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=16,
        head_dim=128, num_experts=64, top_k=8, expert_hidden_size=1024, norm_topk_prob=False,
        qk_norm="full", rope_theta=10000.0, rms_norm_eps=1e-5, max_seq_len=4096,
    ),
    "mixtral-8x7b": ModelConfig(
        name="mixtral-8x7b", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128, num_experts=8, top_k=2, expert_hidden_size=14336, norm_topk_prob=True,
        rope_theta=1e6, rms_norm_eps=1e-5, max_seq_len=32768,
    ),
    "qwen1.5-moe-a2.7b": ModelConfig(
        name="qwen1.5-moe-a2.7b", vocab_size=151936, hidden_size=2048, num_layers=24, num_heads=16,
        num_kv_heads=16, head_dim=128, num_experts=60, top_k=4, expert_hidden_size=1408, norm_topk_prob=False,
        attention_bias=True, shared_expert_hidden_size=5632, shared_expert_gate=True, rope_theta=1e6,
        rms_norm_eps=1e-6, max_seq_len=8192,
    ),
    "qwen3-30b-a3b": ModelConfig(
        name="qwen3-30b-a3b", vocab_size=151936, hidden_size=2048, num_layers=48, num_heads=32, num_kv_heads=4,
        head_dim=128, num_experts=128, top_k=8, expert_hidden_size=768, norm_topk_prob=True, qk_norm="per_head",
        rope_theta=1e6, rms_norm_eps=1e-6, max_seq_len=40960,
    ),
    # FLAME-MoE-290M: 9 layers, the first dense, 64 routed experts of which 6 are selected, and two
    # always-on shared experts (modelled here as one MLP of twice the expert width).
    # NOTE: the widths and vocabulary are estimates for a model of this size, not its published config.
    "flame-moe-290m-like": ModelConfig(
        name="flame-moe-290m-like", vocab_size=50304, hidden_size=512, num_layers=9, num_heads=8, num_kv_heads=8,
        head_dim=64, num_experts=64, top_k=6, expert_hidden_size=352, shared_expert_hidden_size=704,
        dense_layers=(0,), dense_hidden_size=1408, rope_theta=10000.0, rms_norm_eps=1e-5, max_seq_len=2048,
    ),
    # Byte-level model that trains on two CPU cores in minutes (experiments/train_tiny_moe.py).
    "tiny-moe": ModelConfig(
        name="tiny-moe", vocab_size=256, hidden_size=64, num_layers=8, num_heads=4, num_kv_heads=4, head_dim=16,
        num_experts=64, top_k=8, expert_hidden_size=32, qk_norm="full", rope_theta=10000.0, rms_norm_eps=1e-5,
        max_seq_len=1024,
    ),
}


def get_preset(name: str) -> ModelConfig:
    """Return the preset called `name`; raise `ValueError` listing the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset '{name}': expected one of {', '.join(sorted(PRESETS))}") from None

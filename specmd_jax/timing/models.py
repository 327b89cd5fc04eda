"""Model shapes for the timing model: layer counts, widths and the byte size of one expert."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The shapes of a decoder-only MoE transformer that set its compute time and expert size.

    Every expert, routed or shared, is a SwiGLU MLP with three weight matrices (gate, up and down) of
    `hidden x ffn` values each. The dense layers, if any, come first, then the MoE layers, which is
    the layout of every preset below.

    Attributes:
      name: preset key or a free label.
      num_layers: all transformer layers, dense ones included.
      num_experts: routed experts per MoE layer (E).
      top_k: routed experts selected per token (K).
      hidden: model width.
      expert_ffn: inner width of one routed expert.
      num_heads, num_kv_heads, head_dim: attention heads, key/value heads and the per-head width.
      vocab_size: rows of the output projection (LM head).
      dtype_bytes: bytes per weight and per KV-cache value (2 for bf16).
      num_dense_layers: leading layers with a dense MLP instead of experts.
      dense_ffn: inner width of the dense MLP of those layers.
      num_shared_experts, shared_expert_ffn: always-active experts per MoE layer and the inner width
        of each; they are counted as resident, so they are never transferred.
      attention_weights: weight count of one attention block; 0 derives it from the head counts
        (q and o: hidden x heads x head_dim each, k and v: hidden x kv_heads x head_dim each).
      kv_cache_width: KV-cache values stored per token per layer; 0 means 2 x kv_heads x head_dim.
      qk_dim, v_dim: per-head width of the query-key product and of the value sum in the attention
        scores; 0 means head_dim.
      source: where the figures come from.
    """

    name: str
    num_layers: int
    num_experts: int
    top_k: int
    hidden: int
    expert_ffn: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype_bytes: int = 2
    num_dense_layers: int = 0
    dense_ffn: int = 0
    num_shared_experts: int = 0
    shared_expert_ffn: int = 0
    attention_weights: int = 0
    kv_cache_width: int = 0
    qk_dim: int = 0
    v_dim: int = 0
    source: str = ""

    def __post_init__(self):
        positive = ("num_layers", "num_experts", "top_k", "hidden", "expert_ffn", "num_heads", "num_kv_heads",
                    "head_dim", "vocab_size", "dtype_bytes")
        non_negative = ("num_dense_layers", "dense_ffn", "num_shared_experts", "shared_expert_ffn",
                        "attention_weights", "kv_cache_width", "qk_dim", "v_dim")
        for field in (*positive, *non_negative):
            value = getattr(self, field)
            low = 1 if field in positive else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"ModelShape.{field}: expected an integer >= {low}, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"ModelShape.top_k: expected at most num_experts={self.num_experts}, got {self.top_k}")
        if self.num_dense_layers >= self.num_layers:
            raise ValueError(
                f"ModelShape.num_dense_layers: expected fewer than num_layers={self.num_layers} (at least one MoE layer), "
                f"got {self.num_dense_layers}"
            )
        if self.num_dense_layers and not self.dense_ffn:
            raise ValueError("ModelShape.dense_ffn: expected a width > 0 when num_dense_layers > 0, got 0")
        if self.num_shared_experts and not self.shared_expert_ffn:
            raise ValueError("ModelShape.shared_expert_ffn: expected a width > 0 when num_shared_experts > 0, got 0")

    @property
    def num_moe_layers(self) -> int:
        """MoE layers (L): the layers a routing trace covers."""
        return self.num_layers - self.num_dense_layers

    @property
    def expert_bytes(self) -> int:
        """Bytes of one routed expert: 3 x hidden x expert_ffn x dtype_bytes (SwiGLU gate, up, down)."""
        return 3 * self.hidden * self.expert_ffn * self.dtype_bytes

    @property
    def shared_expert_bytes(self) -> int:
        """Bytes of all shared experts of one MoE layer."""
        return self.num_shared_experts * 3 * self.hidden * self.shared_expert_ffn * self.dtype_bytes

    @property
    def total_expert_bytes(self) -> int:
        """Bytes of every routed expert of every MoE layer, L x E x expert_bytes."""
        return self.num_moe_layers * self.num_experts * self.expert_bytes

    @property
    def attention_weight_count(self) -> int:
        """Weights of one attention block (`attention_weights`, or derived from the head counts)."""
        if self.attention_weights:
            return self.attention_weights
        query_and_output = 2 * self.hidden * self.num_heads * self.head_dim
        key_and_value = 2 * self.hidden * self.num_kv_heads * self.head_dim
        return query_and_output + key_and_value

    @property
    def kv_values_per_token(self) -> int:
        """KV-cache values stored per token in one layer."""
        return self.kv_cache_width or 2 * self.num_kv_heads * self.head_dim

    @property
    def score_dims(self) -> tuple[int, int]:
        """Per-head (query-key width, value width) of the attention score computation."""
        return (self.qk_dim or self.head_dim, self.v_dim or self.head_dim)


# DeepSeek-V2-Lite uses multi-head latent attention (MLA) with q_lora_rank null, kv_lora_rank 512,
# qk_nope_head_dim 128, qk_rope_head_dim 64, v_head_dim 128 and 16 heads. Its weight count:
# q_proj 2048 x 16 x (128 + 64), kv_a_proj_with_mqa 2048 x (512 + 64), kv_b_proj 512 x 16 x (128 + 128),
# o_proj 16 x 128 x 2048.
DEEPSEEK_V2_LITE_ATTENTION_WEIGHTS = 2048 * 16 * 192 + 2048 * 576 + 512 * 16 * 256 + 16 * 128 * 2048

PRESETS: dict[str, ModelShape] = {
    # OLMoE-1B-7B-0924 config.json on its model card: hidden_size 2048, intermediate_size 1024,
    # num_hidden_layers 16, num_experts 64, num_experts_per_tok 8, num_attention_heads 16,
    # num_key_value_heads 16, vocab_size 50304. Expert: 3 x 2048 x 1024 x 2 B = 12.6 MB; all: 12 GiB.
    "olmoe-1b-7b": ModelShape(
        name="olmoe-1b-7b", num_layers=16, num_experts=64, top_k=8, hidden=2048, expert_ffn=1024,
        num_heads=16, num_kv_heads=16, head_dim=128, vocab_size=50304,
        source="OLMoE-1B-7B-0924 config.json",
    ),
    # Mixtral-8x7B-v0.1 config.json: hidden_size 4096, intermediate_size 14336, num_hidden_layers 32,
    # num_local_experts 8, num_experts_per_tok 2, num_attention_heads 32, num_key_value_heads 8,
    # vocab_size 32000. Expert: 3 x 4096 x 14336 x 2 B = 352 MB; all: 90 GB.
    "mixtral-8x7b": ModelShape(
        name="mixtral-8x7b", num_layers=32, num_experts=8, top_k=2, hidden=4096, expert_ffn=14336,
        num_heads=32, num_kv_heads=8, head_dim=128, vocab_size=32000,
        source="Mixtral-8x7B-v0.1 config.json",
    ),
    # Qwen3-30B-A3B config.json: hidden_size 2048, moe_intermediate_size 768, num_hidden_layers 48,
    # num_experts 128, num_experts_per_tok 8, num_attention_heads 32, num_key_value_heads 4,
    # head_dim 128, vocab_size 151936. Expert: 3 x 2048 x 768 x 2 B = 9.4 MB; all: 58 GB.
    "qwen3-30b-a3b": ModelShape(
        name="qwen3-30b-a3b", num_layers=48, num_experts=128, top_k=8, hidden=2048, expert_ffn=768,
        num_heads=32, num_kv_heads=4, head_dim=128, vocab_size=151936,
        source="Qwen3-30B-A3B config.json",
    ),
    # DeepSeek-V2-Lite config.json: hidden_size 2048, num_hidden_layers 27 with first_k_dense_replace 1
    # (one dense layer of intermediate_size 10944, then 26 MoE layers), n_routed_experts 64,
    # num_experts_per_tok 6, moe_intermediate_size 1408, n_shared_experts 2, num_attention_heads 16,
    # vocab_size 102400. Expert: 3 x 2048 x 1408 x 2 B = 17.3 MB; all: 29 GB.
    # NOTE: MLA is approximated. The KV cache stores the 512 + 64 latent values per token, and the scores
    # use the absorbed widths (576 for query-key, 512 for values) for every pass, prefill included.
    "deepseek-v2-lite": ModelShape(
        name="deepseek-v2-lite", num_layers=27, num_experts=64, top_k=6, hidden=2048, expert_ffn=1408,
        num_heads=16, num_kv_heads=16, head_dim=128, vocab_size=102400,
        num_dense_layers=1, dense_ffn=10944, num_shared_experts=2, shared_expert_ffn=1408,
        attention_weights=DEEPSEEK_V2_LITE_ATTENTION_WEIGHTS, kv_cache_width=576, qk_dim=576, v_dim=512,
        source="DeepSeek-V2-Lite config.json; MLA approximated",
    ),
    # FLAME-MoE-290M-1.3B (Kang, Yu, Xiong 2025, arXiv:2505.20225). The FLAME-MoE release script
    # scripts/release/flame-moe-290m.sh sets NUM_LAYERS 9, HIDDEN_SIZE 1024, FFN_HIDDEN_SIZE 5472 (the
    # dense layer), MOE_FFN_HIDDEN_SIZE 704 and MOE_LAYER_FREQ "[0]*1+[1]*8" (first layer dense). Its
    # training script sets 16 attention heads, 64 experts and 2 shared experts of width 704 (a shared
    # intermediate size of 2 x 704). These give 1.30e9 parameters in all and 0.30e9 active (embeddings included), matching the name.
    # Top-6 is what the published routing traces record. Expert: 3 x 1024 x 704 x 2 B = 4.3 MB; all: 2.2 GB.
    # NOTE: the vocabulary (GPT-2 BPE, 50277 tokens, padded to 50304) is an estimate.
    "flame-moe-290m": ModelShape(
        name="flame-moe-290m", num_layers=9, num_experts=64, top_k=6, hidden=1024, expert_ffn=704,
        num_heads=16, num_kv_heads=16, head_dim=64, vocab_size=50304,
        num_dense_layers=1, dense_ffn=5472, num_shared_experts=2, shared_expert_ffn=704,
        source="FLAME-MoE release script flame-moe-290m.sh; vocabulary estimated",
    ),
}


def get_model_shape(name: str) -> ModelShape:
    """Return the model preset called `name`; raise `ValueError` listing the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset '{name}': expected one of {', '.join(sorted(PRESETS))}") from None

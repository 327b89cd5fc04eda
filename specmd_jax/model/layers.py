"""Building blocks of the decoder: RMSNorm, rotary embeddings, grouped-query attention with an
optional KV cache, and the SwiGLU MLP.

Shapes: B batch, S new tokens, T cache slots, H hidden size, Q query heads, G key/value heads,
D head dimension.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from specmd_jax.model.config import ModelConfig

INIT_STD = 0.02
"""Standard deviation of the normal initialiser of every weight matrix (the Hugging Face default)."""


def default_init():
    return nnx.initializers.normal(INIT_STD)


def linear(in_features: int, out_features: int, config: ModelConfig, rngs: nnx.Rngs, *, use_bias: bool = False) -> nnx.Linear:
    """Create a `nnx.Linear` with kernel [in, out] in the model's dtype."""
    dtype = jnp.dtype(config.dtype)
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=dtype,
        kernel_init=default_init(), rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """Root-mean-square normalisation computed in float32, then scaled by a learned weight."""

    def __init__(self, size: int, eps: float, dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.ones((size,), dtype=dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """Cosine and sine tables [..., D] for the rotate-half RoPE layout (the Hugging Face Llama layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, S, heads, D] by the tables [B, S, D]: the first and second halves of D form the pairs."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class LayerCache(NamedTuple):
    """Keys and values of one attention layer: [B, T, G, D] each."""

    keys: jax.Array
    values: jax.Array


class Attention(nnx.Module):
    """Causal grouped-query self-attention with RoPE and optional QK-norm and QKV clipping."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        q_size = config.num_heads * config.head_dim
        kv_size = config.num_kv_heads * config.head_dim
        dtype = jnp.dtype(config.dtype)
        self.q_proj = linear(config.hidden_size, q_size, config, rngs, use_bias=config.attention_bias)
        self.k_proj = linear(config.hidden_size, kv_size, config, rngs, use_bias=config.attention_bias)
        self.v_proj = linear(config.hidden_size, kv_size, config, rngs, use_bias=config.attention_bias)
        self.o_proj = linear(q_size, config.hidden_size, config, rngs)
        if config.qk_norm == "full":
            self.q_norm = RMSNorm(q_size, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(kv_size, config.rms_norm_eps, dtype)
        elif config.qk_norm == "per_head":
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype)
        else:
            self.q_norm = None
            self.k_norm = None
        self.config = config

    def __call__(self, x: jax.Array, start: jax.Array, cache: LayerCache | None) -> tuple[jax.Array, LayerCache | None]:
        """Attend from the S tokens of x [B, S, H] at positions start .. start + S - 1.

        Without a cache the keys are those S tokens. With a cache, their keys and values are written
        to slots start .. start + S - 1 and the queries attend to every slot up to their own position.
        Slots past it (stale or unwritten) are masked out.
        """
        config = self.config
        batch, length, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if config.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if config.clip_qkv is not None:
            q = jnp.clip(q, -config.clip_qkv, config.clip_qkv)
            k = jnp.clip(k, -config.clip_qkv, config.clip_qkv)
            v = jnp.clip(v, -config.clip_qkv, config.clip_qkv)
        q = q.reshape(batch, length, config.num_heads, config.head_dim)
        k = k.reshape(batch, length, config.num_kv_heads, config.head_dim)
        v = v.reshape(batch, length, config.num_kv_heads, config.head_dim)
        if config.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)

        positions = start + jnp.arange(length, dtype=jnp.int32)
        cos, sin = rope_tables(jnp.broadcast_to(positions, (batch, length)), config.head_dim, config.rope_theta, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache is None:
            keys, values, key_positions = k, v, positions
        else:
            keys = jax.lax.dynamic_update_slice(cache.keys, k.astype(cache.keys.dtype), (0, start, 0, 0))
            values = jax.lax.dynamic_update_slice(cache.values, v.astype(cache.values.dtype), (0, start, 0, 0))
            cache = LayerCache(keys, values)
            key_positions = jnp.arange(keys.shape[1], dtype=jnp.int32)

        # Scores [B, G, Q/G, S, T]: each group of Q/G query heads shares one key/value head.
        groups = config.num_heads // config.num_kv_heads
        q = q.reshape(batch, length, config.num_kv_heads, groups, config.head_dim)
        scores = jnp.einsum("bsgqd,btgd->bgqst", q, keys.astype(q.dtype)).astype(jnp.float32)
        scores = scores * (config.head_dim ** -0.5)
        visible = key_positions[None, :] <= positions[:, None]
        scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        out = jnp.einsum("bgqst,btgd->bsgqd", weights, values.astype(x.dtype))
        out = out.reshape(batch, length, config.num_heads * config.head_dim)
        return self.o_proj(out), cache


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)), the MLP of dense layers and of the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int, config: ModelConfig, *, rngs: nnx.Rngs):
        self.gate_proj = linear(hidden_size, intermediate_size, config, rngs)
        self.up_proj = linear(hidden_size, intermediate_size, config, rngs)
        self.down_proj = linear(intermediate_size, hidden_size, config, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))

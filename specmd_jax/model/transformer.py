"""The decoder-only MoE transformer and its routing record.

`MoeTransformer.__call__(tokens)` is plain inference and returns logits. `MoeTransformer.forward`
adds an optional KV cache and, with `record=True`, returns the routing of every MoE layer.

Shapes: B batch, S tokens in this call, L MoE layers, E experts, K experts per token, H hidden size.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from specmd_jax.model.config import ModelConfig
from specmd_jax.model.layers import Attention, LayerCache, RMSNorm, SwiGLU, default_init, linear
from specmd_jax.model.moe import MoeBlock


class KVCache(NamedTuple):
    """Keys and values of every layer ([B, T, G, D] each) and the number of filled positions."""

    layers: tuple[LayerCache, ...]
    length: jax.Array  # int32 scalar: positions 0 .. length - 1 are filled


def init_cache(config: ModelConfig, batch: int, max_len: int | None = None) -> KVCache:
    """Create an empty cache with room for `max_len` positions (default `config.max_seq_len`)."""
    max_len = config.max_seq_len if max_len is None else max_len
    shape = (batch, max_len, config.num_kv_heads, config.head_dim)
    dtype = jnp.dtype(config.dtype)
    layers = tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers))
    return KVCache(layers, jnp.zeros((), jnp.int32))


class Routing(NamedTuple):
    """Routing of B x S tokens through the L MoE layers, in layer execution order.

    Attributes:
      router_logits: float32 [B, S, L, E].
      expert_ids: int32 [B, S, L, K], highest logit first; ties go to the lower expert id.
      probs: float32 [B, S, L, K] softmax probabilities of the selected experts (not renormalised).
      weights: float32 [B, S, L, K] the combine weights the layer used.
      speculative_logits: float32 [B, S, L, E]: MoE layer l + 1's router applied to layer l's router
        input; NaN for the last MoE layer, which has no next layer.
      hidden: [B, S, L, H] the router input of each MoE layer (the normalised hidden state entering
        the MoE block), or None unless requested.
    """

    router_logits: jax.Array
    expert_ids: jax.Array
    probs: jax.Array
    weights: jax.Array
    speculative_logits: jax.Array
    hidden: jax.Array | None


class ForwardOutput(NamedTuple):
    logits: jax.Array  # float32 [B, S, vocab]
    cache: KVCache | None
    routing: Routing | None


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, is_moe: bool, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        if is_moe:
            self.mlp = MoeBlock(config, rngs=rngs)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.dense_hidden_size, config, rngs=rngs)
        self.is_moe = is_moe

    def __call__(self, x: jax.Array, start: jax.Array, cache: LayerCache | None):
        """Return the new hidden state, the updated layer cache, the MoE routing (or None) and the MoE input."""
        attended, cache = self.self_attn(self.input_layernorm(x), start, cache)
        x = x + attended
        mlp_input = self.post_attention_layernorm(x)
        if self.is_moe:
            out, decision = self.mlp(mlp_input)
            return x + out, cache, decision, mlp_input
        return x + self.mlp(mlp_input), cache, None, None


class MoeTransformer(nnx.Module):
    """Decoder-only transformer whose MLPs are routed MoE blocks (see `ModelConfig`)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype,
            embedding_init=default_init(), rngs=rngs,
        )
        moe_layers = set(config.moe_layers)
        self.layers = nnx.List([DecoderLayer(config, i in moe_layers, rngs=rngs) for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = None if config.tie_embeddings else linear(config.hidden_size, config.vocab_size, config, rngs)
        self.config = config

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """float32 logits [B, S, vocab] of token ids [B, S] (a fresh sequence, no cache)."""
        return self.forward(tokens).logits

    def forward(
        self,
        tokens: jax.Array,
        *,
        cache: KVCache | None = None,
        record: bool = False,
        record_hidden: bool = False,
    ) -> ForwardOutput:
        """Run tokens [B, S] at positions cache.length .. cache.length + S - 1 (0 .. S - 1 without a cache).

        With `record`, also return the `Routing` of every MoE layer; `record_hidden` adds the
        router inputs to it. The caller must keep cache.length + S within the cache size: positions
        past it are silently dropped by `jax.lax.dynamic_update_slice`.
        """
        start = jnp.zeros((), jnp.int32) if cache is None else cache.length
        x = self.embed_tokens(tokens)
        new_layers = []
        decisions, moe_inputs = [], []
        for index, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[index]
            x, layer_cache, decision, mlp_input = layer(x, start, layer_cache)
            new_layers.append(layer_cache)
            if decision is not None:
                decisions.append(decision)
                moe_inputs.append(mlp_input)
        x = self.norm(x)
        if self.lm_head is None:
            logits = self.embed_tokens.attend(x)
        else:
            logits = self.lm_head(x)
        new_cache = None if cache is None else KVCache(tuple(new_layers), start + tokens.shape[1])
        routing = self._routing(tokens.shape, decisions, moe_inputs, record_hidden) if record else None
        return ForwardOutput(logits.astype(jnp.float32), new_cache, routing)

    def moe_blocks(self) -> list[MoeBlock]:
        return [layer.mlp for layer in self.layers if layer.is_moe]

    def _routing(self, token_shape, decisions, moe_inputs, record_hidden: bool) -> Routing:
        batch, length = token_shape

        def stack(arrays):
            return jnp.stack([a.reshape(batch, length, -1) for a in arrays], axis=2)

        # Speculative logits: the next MoE layer's router applied to this layer's router input.
        blocks = self.moe_blocks()
        speculative = [blocks[i + 1].router_logits(moe_inputs[i]) for i in range(len(blocks) - 1)]
        speculative.append(jnp.full((batch, length, self.config.num_experts), jnp.nan, jnp.float32))
        return Routing(
            router_logits=stack([d.logits for d in decisions]),
            expert_ids=stack([d.expert_ids for d in decisions]),
            probs=stack([d.probs for d in decisions]),
            weights=stack([d.weights for d in decisions]),
            speculative_logits=stack(speculative),
            hidden=stack(moe_inputs) if record_hidden else None,
        )

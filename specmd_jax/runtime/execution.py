"""The model split into jitted pieces that run one layer at a time, with routed experts taken from cache slots.

The pieces call the model's own modules (attention, norms, router, shared expert, LM head) and its
`route` and `dispatch_experts` functions. Only the stacked routed-expert weights are left out of the
device state. Each piece compiles once per token shape, and one compiled piece serves every layer,
because all MoE layers (and all dense layers) have the same structure.

Shapes: B batch, S tokens in this pass, H hidden size, E experts, K experts per token, V vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from specmd_jax.model.layers import LayerCache
from specmd_jax.model.moe import dispatch_experts, route
from specmd_jax.model.transformer import KVCache, MoeTransformer, init_cache
from specmd_jax.runtime.experts import HostExperts, is_expert_weight


class LayerRouting(NamedTuple):
    """Output of the first half of an MoE layer: everything before the routed experts run."""

    x: jax.Array  # [B, S, H], the residual stream after attention
    cache: LayerCache
    mlp_input: jax.Array  # [B, S, H], the router input
    expert_ids: jax.Array  # int32 [B * S, K]
    weights: jax.Array  # float32 [B * S, K], combine weights


def _placeholder(abstract_state):
    # Zero-size stand-ins for the expert weights, so `nnx.merge` can rebuild a layer without them.
    return jax.tree.map(lambda leaf: jnp.zeros((0,), leaf.dtype), abstract_state)


class OffloadedModel:
    """A `MoeTransformer` whose routed experts live in host memory (`host`) instead of on the device.

    Every other weight is copied to `device`. The model passed in is not changed; drop it after
    construction to free its own copy of the experts.
    """

    def __init__(self, model: MoeTransformer, device: jax.Device | None = None):
        self.config = model.config
        self.device = device or jax.devices()[0]
        self.host = HostExperts.from_model(model)
        self.moe_layers = self.config.moe_layers
        put = lambda tree: jax.device_put(tree, self.device)  # noqa: E731

        embed_def, embed_state = nnx.split(model.embed_tokens)
        norm_def, norm_state = nnx.split(model.norm)
        head_def, head_state = nnx.split(model.lm_head) if model.lm_head is not None else (None, None)
        self._top_state = put((embed_state, norm_state, head_state))

        self._layer_states = []
        moe_def = dense_def = expert_abstract = None
        for layer in model.layers:
            if layer.is_moe:
                moe_def, experts, rest = nnx.split(layer, is_expert_weight, ...)
                expert_abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), experts)
                self._layer_states.append(put(rest))
            else:
                dense_def, state = nnx.split(layer)
                self._layer_states.append(put(state))
        self._build(embed_def, norm_def, head_def, moe_def, dense_def, expert_abstract)

    def _build(self, embed_def, norm_def, head_def, moe_def, dense_def, expert_abstract) -> None:
        config = self.config

        def merge_moe(state):
            return nnx.merge(moe_def, _placeholder(expert_abstract), state)

        @jax.jit
        def embed(top_state, tokens):
            return nnx.merge(embed_def, top_state[0])(tokens)

        @jax.jit
        def dense_layer(state, x, start, cache):
            x, cache, _, _ = nnx.merge(dense_def, state)(x, start, cache)
            return x, cache

        # The two halves of an MoE layer follow DecoderLayer.__call__ and MoeBlock.__call__.
        @jax.jit
        def attend_and_route(state, x, start, cache) -> LayerRouting:
            layer = merge_moe(state)
            attended, cache = layer.self_attn(layer.input_layernorm(x), start, cache)
            x = x + attended
            mlp_input = layer.post_attention_layernorm(x)
            flat = mlp_input.reshape(-1, mlp_input.shape[-1])
            decision = route(layer.mlp.router_logits(flat), config.top_k, config.norm_topk_prob)
            return LayerRouting(x, cache, mlp_input, decision.expert_ids, decision.weights)

        @jax.jit
        def routed_experts(state, x, mlp_input, expert_ids, weights, slot_table, slots):
            block = merge_moe(state).mlp
            batch, length, hidden = mlp_input.shape
            flat = mlp_input.reshape(batch * length, hidden)
            out = dispatch_experts(flat, slot_table[expert_ids], weights, *slots, block.dispatch)
            if block.shared_expert is not None:
                shared = block.shared_expert(flat)
                if block.shared_expert_gate is not None:
                    shared = jax.nn.sigmoid(block.shared_expert_gate(flat)) * shared
                out = out + shared
            return x + out.reshape(batch, length, hidden)

        @jax.jit
        def speculate(next_state, mlp_input):
            # The next MoE layer's router on this layer's router input: the model's speculative logits.
            return merge_moe(next_state).mlp.router_logits(mlp_input.reshape(-1, mlp_input.shape[-1]))

        @jax.jit
        def last_logits(top_state, x):
            embed_state, norm_state, head_state = top_state
            x = nnx.merge(norm_def, norm_state)(x[:, -1])
            if head_def is None:
                logits = nnx.merge(embed_def, embed_state).attend(x)
            else:
                logits = nnx.merge(head_def, head_state)(x)
            return logits.astype(jnp.float32)

        self._embed = embed
        self._dense_layer = dense_layer
        self._attend_and_route = attend_and_route
        self._routed_experts = routed_experts
        self._speculate = speculate
        self._last_logits = last_logits

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """Create an empty KV cache with room for `max_len` positions on the model's device."""
        return jax.device_put(init_cache(self.config, batch, max_len), self.device)

    def embed(self, tokens: np.ndarray) -> jax.Array:
        return self._embed(self._top_state, jax.device_put(np.asarray(tokens, np.int32), self.device))

    def dense_layer(self, layer: int, x: jax.Array, start: jax.Array, cache: LayerCache) -> tuple[jax.Array, LayerCache]:
        return self._dense_layer(self._layer_states[layer], x, start, cache)

    def attend_and_route(self, layer: int, x: jax.Array, start: jax.Array, cache: LayerCache) -> LayerRouting:
        """Run attention and the router of MoE layer `layer` (a transformer layer index)."""
        return self._attend_and_route(self._layer_states[layer], x, start, cache)

    def routed_experts(self, layer: int, routing: LayerRouting, slot_table: np.ndarray, slots: tuple[jax.Array, ...]) -> jax.Array:
        """Add the routed (and shared) experts' output to the residual stream.

        `slot_table` is int32 [E], the slot of each expert of this layer; every selected expert must
        have one, and `slots` must already hold its weights.
        """
        table = jax.device_put(np.asarray(slot_table, np.int32), self.device)
        return self._routed_experts(
            self._layer_states[layer], routing.x, routing.mlp_input, routing.expert_ids, routing.weights, table, slots
        )

    def speculate(self, next_layer: int, mlp_input: jax.Array) -> jax.Array:
        """float32 [B * S, E]: the router logits of MoE layer `next_layer` (a transformer layer index) on `mlp_input`."""
        return self._speculate(self._layer_states[next_layer], mlp_input)

    def last_logits(self, x: jax.Array) -> jax.Array:
        """float32 logits [B, V] of the last position of x [B, S, H]."""
        return self._last_logits(self._top_state, x)

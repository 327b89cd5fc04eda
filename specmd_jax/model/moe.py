"""The routed MoE block: softmax router, exact top-k selection, and expert dispatch.

Shapes: N tokens, H hidden size, I expert intermediate size, E experts, K experts per token.

Tie rule: experts are selected with `jax.lax.top_k` on the float32 router logits, which orders equal
values by index, so among experts with equal logits the lower expert id is selected and ranked first.
Selecting on the logits rather than on the softmax probabilities avoids ties that only rounding in
the softmax creates. Because the softmax is monotonic, the selection is otherwise the same.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from specmd_jax.model.config import ModelConfig
from specmd_jax.model.layers import SwiGLU, default_init, linear


class RoutingDecision(NamedTuple):
    """The router's output for N tokens.

    Attributes:
      logits: float32 [N, E] router logits.
      expert_ids: int32 [N, K] selected experts, highest logit first (ties: lower id first).
      probs: float32 [N, K] softmax probabilities of the selected experts over all E experts.
      weights: float32 [N, K] combine weights: `probs`, renormalised to sum to 1 when the config
        sets `norm_topk_prob`.
    """

    logits: jax.Array
    expert_ids: jax.Array
    probs: jax.Array
    weights: jax.Array


def route(logits: jax.Array, top_k: int, norm_topk_prob: bool) -> RoutingDecision:
    """Select the top-k experts of each row of `logits` [N, E] and compute their weights."""
    logits = logits.astype(jnp.float32)
    _, expert_ids = jax.lax.top_k(logits, top_k)
    probs = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), expert_ids, axis=-1)
    weights = probs / jnp.sum(probs, axis=-1, keepdims=True) if norm_topk_prob else probs
    return RoutingDecision(logits, expert_ids.astype(jnp.int32), probs, weights)


DISPATCH_METHODS = ("auto", "ragged", "dense", "gather")
"""Ways to evaluate the selected experts; all return the same result up to float rounding.

ragged: sort the N * K (token, expert) pairs by expert and multiply each contiguous group by its
  own expert's weights with `jax.lax.ragged_dot`. Work is proportional to N * K; the fast path on
  GPU and TPU.
dense: run every expert on every token and weight the outputs by a sparse [N, E] combine matrix.
  Work is proportional to N * E, but XLA:CPU runs it faster than `ragged_dot` for small experts.
gather: gather the K weight matrices of each token ([N, K, H, I]); the cheapest for a few tokens
  (decoding), wasteful in memory for many.
auto: gather when N * K <= E, else dense on the CPU backend and ragged elsewhere.
"""


def _dispatch_ragged(x, expert_ids, weights, gate_proj, up_proj, down_proj):
    num_tokens, top_k = expert_ids.shape
    num_experts = gate_proj.shape[0]
    flat_ids = expert_ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)
    token_of_pair = order // top_k
    group_sizes = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)

    # Expert computation on the sorted pairs, one group of rows per expert.
    rows = x[token_of_pair]
    gate = jax.lax.ragged_dot(rows, gate_proj, group_sizes)
    up = jax.lax.ragged_dot(rows, up_proj, group_sizes)
    outputs = jax.lax.ragged_dot(jax.nn.silu(gate) * up, down_proj, group_sizes)

    # Combine: weight each pair's output and add it to its token's row.
    pair_weights = weights.reshape(-1)[order]
    weighted = outputs.astype(jnp.float32) * pair_weights[:, None]
    return jnp.zeros((num_tokens, x.shape[-1]), jnp.float32).at[token_of_pair].add(weighted)


def _dispatch_dense(x, expert_ids, weights, gate_proj, up_proj, down_proj):
    num_tokens = x.shape[0]
    num_experts = gate_proj.shape[0]
    combine = jnp.zeros((num_tokens, num_experts), jnp.float32)
    combine = combine.at[jnp.arange(num_tokens)[:, None], expert_ids].add(weights.astype(jnp.float32))
    hidden = jax.nn.silu(jnp.einsum("nh,ehi->eni", x, gate_proj)) * jnp.einsum("nh,ehi->eni", x, up_proj)
    outputs = jnp.einsum("eni,eih->enh", hidden, down_proj).astype(jnp.float32)
    return jnp.einsum("enh,ne->nh", outputs, combine)


def _dispatch_gather(x, expert_ids, weights, gate_proj, up_proj, down_proj):
    gate = jnp.einsum("nh,nkhi->nki", x, gate_proj[expert_ids])
    up = jnp.einsum("nh,nkhi->nki", x, up_proj[expert_ids])
    outputs = jnp.einsum("nki,nkih->nkh", jax.nn.silu(gate) * up, down_proj[expert_ids]).astype(jnp.float32)
    return jnp.einsum("nkh,nk->nh", outputs, weights.astype(jnp.float32))


def resolve_dispatch(method: str, num_tokens: int, top_k: int, num_experts: int) -> str:
    """Turn "auto" into a concrete method for this call's static shapes (see `DISPATCH_METHODS`)."""
    if method not in DISPATCH_METHODS:
        raise ValueError(f"invalid dispatch method {method!r}: expected one of {DISPATCH_METHODS}")
    if method != "auto":
        return method
    if num_tokens * top_k <= num_experts:
        return "gather"
    return "dense" if jax.default_backend() == "cpu" else "ragged"


def dispatch_experts(
    x: jax.Array,
    expert_ids: jax.Array,
    weights: jax.Array,
    gate_proj: jax.Array,
    up_proj: jax.Array,
    down_proj: jax.Array,
    method: str = "auto",
) -> jax.Array:
    """Return sum_k weights[n, k] * expert_{ids[n, k]}(x[n]) for x [N, H].

    Expert e is down_proj[e] applied to silu(x @ gate_proj[e]) * (x @ up_proj[e]), with gate_proj,
    up_proj [E, H, I] and down_proj [E, I, H]. Products are summed in float32 and cast to x's dtype.
    """
    chosen = resolve_dispatch(method, x.shape[0], expert_ids.shape[1], gate_proj.shape[0])
    implementation = {"ragged": _dispatch_ragged, "dense": _dispatch_dense, "gather": _dispatch_gather}[chosen]
    return implementation(x, expert_ids, weights, gate_proj, up_proj, down_proj).astype(x.dtype)


class MoeBlock(nnx.Module):
    """Router, E SwiGLU experts and an optional always-on shared expert."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dispatch: str = "auto"):
        dtype = jnp.dtype(config.dtype)
        shape_in = (config.num_experts, config.hidden_size, config.expert_hidden_size)
        shape_out = (config.num_experts, config.expert_hidden_size, config.hidden_size)
        init = default_init()
        self.router = linear(config.hidden_size, config.num_experts, config, rngs)
        self.gate_proj = nnx.Param(init(rngs.params(), shape_in, dtype))
        self.up_proj = nnx.Param(init(rngs.params(), shape_in, dtype))
        self.down_proj = nnx.Param(init(rngs.params(), shape_out, dtype))
        if config.shared_expert_hidden_size:
            self.shared_expert = SwiGLU(config.hidden_size, config.shared_expert_hidden_size, config, rngs=rngs)
        else:
            self.shared_expert = None
        self.shared_expert_gate = linear(config.hidden_size, 1, config, rngs) if config.shared_expert_gate else None
        self.config = config
        self.dispatch = dispatch  # one of DISPATCH_METHODS; not a weight, so checkpoints ignore it

    def router_logits(self, x: jax.Array) -> jax.Array:
        """float32 router logits [..., E] of inputs x [..., H]."""
        return self.router(x).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, RoutingDecision]:
        """Apply the block to x [B, S, H]; return the output and the routing of the B * S tokens."""
        batch, length, hidden = x.shape
        flat = x.reshape(batch * length, hidden)
        decision = route(self.router_logits(flat), self.config.top_k, self.config.norm_topk_prob)
        out = dispatch_experts(
            flat, decision.expert_ids, decision.weights,
            self.gate_proj[...], self.up_proj[...], self.down_proj[...], self.dispatch,
        )
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.shared_expert_gate is not None:
                shared = jax.nn.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        return out.reshape(batch, length, hidden), decision

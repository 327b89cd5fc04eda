"""Tests of the Flax MoE model: routing, expert dispatch, KV cache, generation and routing records."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from specmd_jax.model import (
    ModelConfig, MoeTransformer, dispatch_experts, get_preset, greedy_generate, init_cache, route,
)
from specmd_jax.model.moe import DISPATCH_METHODS, resolve_dispatch


def small_config(**changes) -> ModelConfig:
    base = ModelConfig(
        name="test", vocab_size=50, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
        num_experts=8, top_k=3, expert_hidden_size=16, qk_norm="full", max_seq_len=64,
    )
    return base.replace(**changes)


def expert_loop(x, expert_ids, weights, gate_proj, up_proj, down_proj):
    """Per-token, per-expert reference for `dispatch_experts` in float64 numpy."""
    x, gate_proj, up_proj, down_proj = (np.asarray(a, np.float64) for a in (x, gate_proj, up_proj, down_proj))
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        for k in range(expert_ids.shape[1]):
            e = int(expert_ids[n, k])
            gate = x[n] @ gate_proj[e]
            hidden = gate / (1.0 + np.exp(-gate)) * (x[n] @ up_proj[e])
            out[n] += float(weights[n, k]) * (hidden @ down_proj[e])
    return out


@pytest.mark.parametrize("method", [m for m in DISPATCH_METHODS])
@pytest.mark.parametrize("num_tokens", [1, 37])
def test_dispatch_matches_expert_loop(method, num_tokens):
    keys = jax.random.split(jax.random.key(num_tokens), 5)
    num_experts, top_k, hidden, inner = 8, 3, 12, 10
    x = jax.random.normal(keys[0], (num_tokens, hidden))
    logits = jax.random.normal(keys[1], (num_tokens, num_experts))
    decision = route(logits, top_k, norm_topk_prob=False)
    gate_proj = jax.random.normal(keys[2], (num_experts, hidden, inner)) * 0.3
    up_proj = jax.random.normal(keys[3], (num_experts, hidden, inner)) * 0.3
    down_proj = jax.random.normal(keys[4], (num_experts, inner, hidden)) * 0.3

    fast = dispatch_experts(x, decision.expert_ids, decision.weights, gate_proj, up_proj, down_proj, method)
    slow = expert_loop(x, np.asarray(decision.expert_ids), np.asarray(decision.weights), gate_proj, up_proj, down_proj)
    np.testing.assert_allclose(np.asarray(fast), slow, rtol=1e-4, atol=1e-5)


def test_dispatch_auto_choices():
    assert resolve_dispatch("auto", 1, 8, 64) == "gather"
    assert resolve_dispatch("auto", 4096, 8, 64) in ("dense", "ragged")
    with pytest.raises(ValueError, match="invalid dispatch method"):
        resolve_dispatch("loop", 1, 1, 1)


def test_route_tie_rule_prefers_lower_id():
    # Experts 1, 2 and 4 tie at 3.0; top-2 takes the two lowest ids, in id order.
    decision = route(jnp.array([[1.0, 3.0, 3.0, 0.0, 3.0]]), 2, norm_topk_prob=False)
    assert decision.expert_ids.tolist() == [[1, 2]]


def test_route_weights_renormalised_or_not():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
    plain = route(logits, 2, norm_topk_prob=False)
    renormalised = route(logits, 2, norm_topk_prob=True)
    np.testing.assert_allclose(plain.weights, [[0.5, 0.3]], rtol=1e-6)
    np.testing.assert_allclose(renormalised.weights, [[0.625, 0.375]], rtol=1e-6)
    np.testing.assert_allclose(renormalised.probs, [[0.5, 0.3]], rtol=1e-6)


ARCHITECTURES = {
    "olmoe-like": {},
    "mixtral-like": dict(qk_norm="none", top_k=2, norm_topk_prob=True, num_kv_heads=1),
    "qwen2-moe-like": dict(qk_norm="none", attention_bias=True, shared_expert_hidden_size=24, shared_expert_gate=True),
    "qwen3-moe-like": dict(qk_norm="per_head", norm_topk_prob=True),
    "flame-like": dict(qk_norm="none", dense_layers=(0,), dense_hidden_size=40, shared_expert_hidden_size=32),
    "tied-clipped": dict(tie_embeddings=True, clip_qkv=0.5),
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_cache_matches_full_pass(name):
    config = small_config(**ARCHITECTURES[name])
    model = MoeTransformer(config, rngs=nnx.Rngs(1))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 11)), jnp.int32)
    full = model(tokens)

    cache = init_cache(config, 2, 16)
    first = model.forward(tokens[:, :7], cache=cache)
    logits = [first.logits]
    cache = first.cache
    for position in range(7, 11):
        out = model.forward(tokens[:, position:position + 1], cache=cache)
        logits.append(out.logits)
        cache = out.cache
    assert int(cache.length) == 11
    np.testing.assert_allclose(np.concatenate(logits, axis=1), full, rtol=1e-4, atol=1e-5)


def test_record_leaves_logits_unchanged():
    config = small_config(dense_layers=(1,), dense_hidden_size=24)
    model = MoeTransformer(config, rngs=nnx.Rngs(2))
    tokens = jnp.arange(9, dtype=jnp.int32)[None, :]
    plain = model(tokens)
    recorded = model.forward(tokens, record=True, record_hidden=True)
    np.testing.assert_array_equal(plain, recorded.logits)

    routing = recorded.routing
    assert routing.router_logits.shape == (1, 9, 2, 8)
    assert routing.expert_ids.shape == (1, 9, 2, 3)
    assert routing.hidden.shape == (1, 9, 2, 32)
    assert model.forward(tokens, record=True).routing.hidden is None


def test_record_routing_consistent():
    config = small_config()
    model = MoeTransformer(config, rngs=nnx.Rngs(3))
    routing = model.forward(jnp.arange(6, dtype=jnp.int32)[None, :], record=True, record_hidden=True).routing
    _, expected_ids = jax.lax.top_k(routing.router_logits, config.top_k)
    np.testing.assert_array_equal(routing.expert_ids, expected_ids)

    # Speculative logits of layer l = router of layer l + 1 applied to layer l's router input.
    blocks = model.moe_blocks()
    for layer in range(config.num_moe_layers - 1):
        expected = blocks[layer + 1].router_logits(routing.hidden[:, :, layer])
        np.testing.assert_allclose(routing.speculative_logits[:, :, layer], expected, rtol=1e-6)
    assert np.isnan(np.asarray(routing.speculative_logits[:, :, -1])).all()


def test_greedy_generate_matches_uncached_argmax():
    config = small_config()
    model = MoeTransformer(config, rngs=nnx.Rngs(4))
    prompt = np.array([[3, 1, 4, 1, 5]], np.int32)
    generation = greedy_generate(model, prompt, 4, record=True)

    # Reference: recompute the whole sequence without a cache for every new token.
    sequence = prompt
    for _ in range(4):
        next_token = int(jnp.argmax(model(jnp.asarray(sequence))[0, -1]))
        sequence = np.concatenate([sequence, [[next_token]]], axis=1)
    np.testing.assert_array_equal(generation.tokens, sequence[:, 5:])
    assert [p.expert_ids.shape[1] for p in generation.passes] == [5, 1, 1, 1]


def test_greedy_generate_rejects_overlong():
    model = MoeTransformer(small_config(max_seq_len=8), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_seq_len=8"):
        greedy_generate(model, np.zeros((1, 6), np.int32), 4)


def test_config_validation_messages():
    with pytest.raises(ValueError, match="top_k"):
        small_config(top_k=9)
    with pytest.raises(ValueError, match="qk_norm"):
        small_config(qk_norm="both")
    with pytest.raises(ValueError, match="dense_layers"):
        small_config(dense_layers=(0, 1, 2), dense_hidden_size=8)
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("gpt-moe")


def test_config_dict_round_trip():
    config = get_preset("flame-moe-290m-like")
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.moe_layers == tuple(range(1, 9))

"""Least-Stale by rank counting must give the generic scan's totals at every capacity (per-layer scope)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specmd_jax.policies.base import NEVER
from specmd_jax.sim import SimConfig, build_requests, run_sweep
from specmd_jax.sim.requests import StepRequests
from specmd_jax.sim.least_stale_layers import simulate_least_stale_per_layer
from specmd_jax.traces import PASS_DECODE, PASS_PREFILL, TraceMetadata, make_trace
from specmd_jax.traces.flame import load_flame_npz
from specmd_jax.traces.mixtral import load_mixtral_jsonl

FIELDS = (
    ("requests", "requests"),
    ("hits", "hits"),
    ("compulsory", "compulsory_misses"),
    ("capacity", "capacity_misses"),
    ("collision", "collision_misses"),
    ("evictions", "evictions"),
)


def _assert_same(requests, num_experts: int, pool_capacities: list[int]) -> None:
    """Compare every field at each capacity (slots per layer) with the generic Least-Stale scan."""
    configs = [SimConfig("least-stale", capacity * requests.num_layers) for capacity in pool_capacities]
    generic = run_sweep(requests, configs, scope="per-layer", num_experts=num_experts, fast_paths=False)
    ranked = simulate_least_stale_per_layer(
        jnp.asarray(pool_capacities, jnp.int32), jnp.asarray(requests.experts), num_experts=num_experts
    )
    for index, slow in enumerate(generic):
        for ranked_field, slow_field in FIELDS:
            assert int(getattr(ranked, ranked_field)[index]) == getattr(slow, slow_field), (pool_capacities[index], ranked_field)
        np.testing.assert_array_equal(np.asarray(ranked.hits_per_layer[index]), slow.hits_per_layer)
        np.testing.assert_array_equal(np.asarray(ranked.requests_per_layer[index]), slow.requests_per_layer)


def _all_feasible(requests, num_experts: int) -> list[int]:
    return list(range(max(int(requests.counts.max()), 1), num_experts + 1))


def _make_trace(expert_ids: np.ndarray, missing: np.ndarray, pass_lengths: np.ndarray, num_experts: int):
    """A trace whose passes have the given token counts; passes of more than one token are prefill."""
    num_layers, top_k = expert_ids.shape[1], expert_ids.shape[2]
    expert_ids = np.where(missing[..., None], -1, expert_ids)
    offsets = np.concatenate([[0], np.cumsum(pass_lengths)])
    kinds = np.where(pass_lengths > 1, PASS_PREFILL, PASS_DECODE).astype(np.int8)
    metadata = TraceMetadata("random", num_layers, num_experts, top_k, "test_least_stale_layers")
    return make_trace(expert_ids, metadata, missing=missing, pass_offsets=offsets, pass_kind=kinds)


def _random_trace(seed: int, num_experts: int, top_k: int = 2, num_layers: int = 3, num_passes: int = 40):
    """Passes of 1 to 4 tokens, with 15% of the cells missing, and skewed expert popularity."""
    rng = np.random.default_rng(seed)
    pass_lengths = rng.integers(1, 5, num_passes)
    num_tokens = int(pass_lengths.sum())
    popularity = rng.dirichlet(np.full(num_experts, 0.5))
    ids = np.stack(
        [[rng.choice(num_experts, top_k, replace=False, p=popularity) for _ in range(num_layers)] for _ in range(num_tokens)]
    )
    missing = rng.random((num_tokens, num_layers)) < 0.15
    return _make_trace(ids, missing, pass_lengths, num_experts)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ranks_random_traces(seed: int) -> None:
    trace = _random_trace(seed, num_experts=7)
    requests = build_requests(trace)
    assert (requests.counts == 0).any(), "the trace should contain steps without requests"
    _assert_same(requests, trace.num_experts, _all_feasible(requests, trace.num_experts))


def test_ranks_wide_requests() -> None:
    """Top-6 of 20 experts over prefill passes: request sets up to 20 and large same-pass groups."""
    trace = _random_trace(9, num_experts=20, top_k=6, num_passes=60)
    requests = build_requests(trace)
    _assert_same(requests, trace.num_experts, _all_feasible(requests, trace.num_experts))


def test_ranks_hits_leave_before_misses() -> None:
    """Hand-checked: within one pass's requests, the hits are evicted before the misses."""
    # One layer, capacity 3. Pass 0 misses 0 and 2. Pass 1 hits 2 and misses 1, so the queue is 0, then 2
    # (hit) and 1 (miss). Pass 2 misses 3 and evicts 0. Pass 3 misses 4 and evicts 2, the hit of pass 1,
    # before 1, so pass 4 hits 1. LRU breaks the tie by expert id alone: it evicts 1, and pass 4 misses.
    experts = np.array([[[0, 2]], [[1, 2]], [[3, -1]], [[4, -1]], [[1, -1]]], np.int32)
    totals = simulate_least_stale_per_layer(jnp.asarray([3], jnp.int32), jnp.asarray(experts), num_experts=5)
    assert totals.hits.tolist() == [2]
    assert totals.compulsory.tolist() == [5]
    assert totals.capacity.tolist() == [0]
    assert totals.evictions.tolist() == [2]
    requests = StepRequests(experts, np.where(experts >= 0, NEVER, -1).astype(np.int32), np.sum(experts >= 0, axis=2))
    generic = run_sweep(requests, [SimConfig("least-stale", 3)], scope="per-layer", num_experts=5, fast_paths=False)[0]
    assert generic.hits == 2
    lru = run_sweep(requests, [SimConfig("lru", 3)], scope="per-layer", num_experts=5, fast_paths=False)[0]
    assert lru.hits == 1


@st.composite
def small_traces(draw):
    num_layers = draw(st.integers(1, 3))
    num_experts = draw(st.integers(2, 6))
    top_k = draw(st.integers(1, min(3, num_experts)))
    num_passes = draw(st.integers(1, 12))
    pass_lengths = np.array(draw(st.lists(st.integers(1, 3), min_size=num_passes, max_size=num_passes)))
    num_tokens = int(pass_lengths.sum())
    top_k_sets = st.lists(st.integers(0, num_experts - 1), min_size=top_k, max_size=top_k, unique=True)
    cells = draw(st.lists(top_k_sets, min_size=num_tokens * num_layers, max_size=num_tokens * num_layers))
    ids = np.array(cells, np.int16).reshape(num_tokens, num_layers, top_k)
    missing_flags = draw(st.lists(st.booleans(), min_size=num_tokens * num_layers, max_size=num_tokens * num_layers))
    missing = np.array(missing_flags).reshape(num_tokens, num_layers)
    return _make_trace(ids, missing, pass_lengths, num_experts)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trace=small_traces())
def test_ranks_match_generic_property(trace) -> None:
    requests = build_requests(trace)
    _assert_same(requests, trace.num_experts, _all_feasible(requests, trace.num_experts))


def test_ranks_flame_prefix(flame_npz) -> None:
    trace = load_flame_npz(flame_npz)
    requests = build_requests(trace)
    passes = 300
    prefix = requests._replace(
        experts=requests.experts[:passes], next_step=requests.next_step[:passes], counts=requests.counts[:passes]
    )
    needed = int(prefix.counts.max())
    _assert_same(prefix, trace.num_experts, [needed, needed + 1, (needed + trace.num_experts) // 2, trace.num_experts])


def test_ranks_mixtral(mixtral_jsonl) -> None:
    trace = load_mixtral_jsonl(mixtral_jsonl)
    requests = build_requests(trace)
    _assert_same(requests, trace.num_experts, _all_feasible(requests, trace.num_experts))


def test_run_sweep_takes_the_rank_path() -> None:
    """run_sweep's per-layer Least-Stale results (rank path) equal the generic scan's."""
    trace = _random_trace(5, num_experts=9)
    requests = build_requests(trace)
    smallest = int(requests.counts.max())
    configs = [SimConfig("least-stale", (smallest + extra) * trace.num_layers) for extra in (0, 2, 5)]
    fast = run_sweep(requests, configs, scope="per-layer", num_experts=trace.num_experts)
    slow = run_sweep(requests, configs, scope="per-layer", num_experts=trace.num_experts, fast_paths=False)
    for a, b in zip(fast, slow):
        assert (a.hits, a.compulsory_misses, a.capacity_misses, a.evictions) == (b.hits, b.compulsory_misses, b.capacity_misses, b.evictions)
        np.testing.assert_array_equal(a.hits_per_layer, b.hits_per_layer)

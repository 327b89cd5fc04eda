"""Least-Stale by rank counting must give the generic scan's totals at every capacity (per-layer scope)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from specmd_jax.policies.base import NEVER
from specmd_jax.sim import SimConfig, build_requests, run_sweep
from specmd_jax.sim.requests import StepRequests
from specmd_jax.sim.least_stale_layers import simulate_least_stale_per_layer
from fast_path_traces import feasible_capacities, skewed_trace, small_traces
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


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ranks_random_traces(seed: int) -> None:
    trace = skewed_trace(seed, num_experts=7)
    requests = build_requests(trace)
    assert (requests.counts == 0).any(), "the trace should contain steps without requests"
    _assert_same(requests, trace.num_experts, feasible_capacities(requests, trace.num_experts))


def test_ranks_wide_requests() -> None:
    """Top-6 of 20 experts over prefill passes: request sets up to 20 and large same-pass groups."""
    trace = skewed_trace(9, num_experts=20, top_k=6, num_passes=60)
    requests = build_requests(trace)
    _assert_same(requests, trace.num_experts, feasible_capacities(requests, trace.num_experts))


@pytest.mark.parametrize("num_experts", [32, 45, 70])
def test_ranks_multiword_bit_sets(num_experts: int) -> None:
    """Pools of 32, 45 and 70 experts fill one word exactly, and spread over two and three words."""
    trace = skewed_trace(11, num_experts=num_experts, top_k=8, num_passes=60)
    requests = build_requests(trace)
    capacities = feasible_capacities(requests, trace.num_experts)
    _assert_same(requests, trace.num_experts, capacities[::3] + [capacities[-1]])


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


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trace=small_traces())
def test_ranks_match_generic_property(trace) -> None:
    requests = build_requests(trace)
    _assert_same(requests, trace.num_experts, feasible_capacities(requests, trace.num_experts))


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
    _assert_same(requests, trace.num_experts, feasible_capacities(requests, trace.num_experts))


def test_run_sweep_takes_the_rank_path() -> None:
    """run_sweep's per-layer Least-Stale results (rank path) equal the generic scan's."""
    trace = skewed_trace(5, num_experts=9)
    requests = build_requests(trace)
    smallest = int(requests.counts.max())
    configs = [SimConfig("least-stale", (smallest + extra) * trace.num_layers) for extra in (0, 2, 5)]
    fast = run_sweep(requests, configs, scope="per-layer", num_experts=trace.num_experts)
    slow = run_sweep(requests, configs, scope="per-layer", num_experts=trace.num_experts, fast_paths=False)
    for a, b in zip(fast, slow):
        assert (a.hits, a.compulsory_misses, a.capacity_misses, a.evictions) == (b.hits, b.compulsory_misses, b.capacity_misses, b.evictions)
        np.testing.assert_array_equal(a.hits_per_layer, b.hits_per_layer)

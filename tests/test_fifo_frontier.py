"""The frontier FIFO simulator must equal the generic FIFO scan for every capacity and scope."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fast_path_traces import small_traces, trace_from_tokens
from specmd_jax.sim import SimConfig, build_requests, run_sweep
from specmd_jax.sim.frontier import simulate_fifo_frontier
from specmd_jax.traces.flame import load_flame_npz

SCOPES = ("global", "per-layer")
FLAME_PASSES = 300


def _assert_same(requests, num_experts: int, scope: str, pool_capacities: list[int]) -> None:
    """Compare every field at each capacity (slots per pool) with `run_sweep`'s generic FIFO scan."""
    layers = requests.num_layers if scope == "per-layer" else 1
    configs = [SimConfig("fifo", capacity * layers) for capacity in pool_capacities]
    generic = run_sweep(requests, configs, scope=scope, num_experts=num_experts, fast_paths=False)
    fast = simulate_fifo_frontier(
        jnp.asarray(pool_capacities, jnp.int32), jnp.asarray(requests.experts), scope=scope, num_experts=num_experts
    )
    fields = (
        ("requests", "requests"),
        ("hits", "hits"),
        ("compulsory", "compulsory_misses"),
        ("capacity", "capacity_misses"),
        ("collision", "collision_misses"),
        ("evictions", "evictions"),
    )
    for index, slow in enumerate(generic):
        where = (scope, pool_capacities[index])
        for fast_field, slow_field in fields:
            assert int(getattr(fast, fast_field)[index]) == getattr(slow, slow_field), where + (fast_field,)
        np.testing.assert_array_equal(np.asarray(fast.hits_per_layer[index]), slow.hits_per_layer, err_msg=str(where))
        np.testing.assert_array_equal(np.asarray(fast.requests_per_layer[index]), slow.requests_per_layer, err_msg=str(where))


def _all_feasible(requests, num_experts: int, scope: str) -> list[int]:
    """Pool capacities from the largest request set of a step up to every item of the pool."""
    pool_items = num_experts if scope == "per-layer" else num_experts * requests.num_layers
    return list(range(max(int(requests.counts.max()), 1), pool_items + 1))


def _random_trace(seed: int, num_layers: int = 3, num_experts: int = 7, top_k: int = 2, num_passes: int = 30):
    """Passes of 1 to 4 tokens (request sets of 0 to 7 experts), with 15% of the cells missing."""
    rng = np.random.default_rng(seed)
    pass_lengths = rng.integers(1, 5, num_passes)
    num_tokens = int(pass_lengths.sum())
    ids = np.stack(
        [[rng.choice(num_experts, top_k, replace=False) for _ in range(num_layers)] for _ in range(num_tokens)]
    )
    missing = rng.random((num_tokens, num_layers)) < 0.15
    return trace_from_tokens(ids, missing, pass_lengths, num_experts)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_frontier_random_traces(scope: str, seed: int) -> None:
    trace = _random_trace(seed)
    requests = build_requests(trace)
    assert (requests.counts == 0).any(), "the trace should contain steps without requests"
    assert len(np.unique(requests.counts)) > 2, "the trace should vary the request count per step"
    _assert_same(requests, trace.num_experts, scope, _all_feasible(requests, trace.num_experts, scope))


@pytest.mark.parametrize("scope", SCOPES)
def test_frontier_wide_prefill_steps(scope: str) -> None:
    """Prefill passes of up to 12 tokens request more than 32 of 70 experts per layer and step."""
    rng = np.random.default_rng(5)
    pass_lengths = rng.integers(1, 13, 12)
    num_tokens = int(pass_lengths.sum())
    ids = np.stack([[rng.choice(70, 8, replace=False) for _ in range(2)] for _ in range(num_tokens)])
    trace = trace_from_tokens(ids, np.zeros((num_tokens, 2), bool), pass_lengths, 70)
    requests = build_requests(trace)
    assert int(requests.counts.max()) > 32, "the trace should exceed one 32-bit word of request slots"
    capacities = _all_feasible(requests, trace.num_experts, scope)
    _assert_same(requests, trace.num_experts, scope, capacities[::7] + [capacities[-1]])


def test_frontier_random_trace_has_collisions() -> None:
    """The random traces cause collision and capacity misses, so the global comparisons check both classes."""
    trace = _random_trace(0)
    requests = build_requests(trace)
    capacity = int(requests.counts.max()) + 2
    fast = simulate_fifo_frontier(jnp.asarray([capacity], jnp.int32), jnp.asarray(requests.experts), scope="global", num_experts=trace.num_experts)
    assert int(fast.collision[0]) > 0
    assert int(fast.capacity[0]) > 0


def test_frontier_skips_requested_items_at_front() -> None:
    """Hand-checked case: the front skips a hit on the oldest item, which stays resident until step 2."""
    # One layer, capacity 2. Step 0 inserts 0 and 1. Step 1 hits 0 and misses 2, so the front passes 0
    # (requested) and evicts 1. Step 2 requests 3: the oldest resident is 0 (skipped, so still the oldest), and 0 is evicted.
    experts = np.array([[[0, 1]], [[0, 2]], [[3, -1]], [[0, 2]]], np.int32)
    fast = simulate_fifo_frontier(jnp.asarray([2], jnp.int32), jnp.asarray(experts), scope="per-layer", num_experts=4)
    # Step 3 hits 2, misses 0 (a capacity miss) and evicts 3, the oldest item it does not request.
    assert int(fast.hits[0]) == 2
    assert int(fast.compulsory[0]) == 4
    assert int(fast.capacity[0]) == 1
    assert int(fast.evictions[0]) == 3


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trace=small_traces(), scope=st.sampled_from(SCOPES))
def test_frontier_matches_generic_property(trace, scope: str) -> None:
    requests = build_requests(trace)
    _assert_same(requests, trace.num_experts, scope, _all_feasible(requests, trace.num_experts, scope))


@pytest.mark.parametrize("scope", SCOPES)
def test_frontier_flame_prefix(flame_npz, scope: str) -> None:
    trace = load_flame_npz(flame_npz)
    requests = build_requests(trace)
    prefix = requests._replace(
        experts=requests.experts[:FLAME_PASSES],
        next_step=requests.next_step[:FLAME_PASSES],
        counts=requests.counts[:FLAME_PASSES],
    )
    needed = int(prefix.counts.max())
    pool_items = trace.num_experts if scope == "per-layer" else trace.num_experts * trace.num_layers
    capacities = sorted({needed, needed + 1, (needed + pool_items) // 2, pool_items})
    _assert_same(prefix, trace.num_experts, scope, capacities)


@pytest.mark.parametrize("scope", SCOPES)
def test_run_sweep_takes_the_frontier_path(scope: str) -> None:
    """run_sweep's FIFO results (fast path, capacities spread over devices) equal the generic scan's."""
    trace = _random_trace(11)
    requests = build_requests(trace)
    layers = requests.num_layers if scope == "per-layer" else 1
    smallest = int(requests.counts.max())
    # An odd number of capacities, so spreading over two devices pads the batch.
    configs = [SimConfig("fifo", (smallest + extra) * layers) for extra in (0, 2, 5)]
    fast = run_sweep(requests, configs, scope=scope, num_experts=trace.num_experts)
    slow = run_sweep(requests, configs, scope=scope, num_experts=trace.num_experts, fast_paths=False)
    for a, b in zip(fast, slow):
        assert (a.hits, a.compulsory_misses, a.capacity_misses, a.collision_misses, a.evictions) == (
            b.hits, b.compulsory_misses, b.capacity_misses, b.collision_misses, b.evictions
        )
        np.testing.assert_array_equal(a.hits_per_layer, b.hits_per_layer)


"""The one-pass OPT stack must give the generic Belady scan's totals at every capacity (per-layer scope)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from specmd_jax.policies.base import NEVER
from specmd_jax.sim import SimConfig, build_requests, run_sweep
from specmd_jax.sim.belady_stack import _position_of_rth, fits_int32, simulate_belady_stack
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
    """Compare every field at each capacity (slots per layer) with the generic Belady scan."""
    configs = [SimConfig("belady", capacity * requests.num_layers) for capacity in pool_capacities]
    generic = run_sweep(requests, configs, scope="per-layer", num_experts=num_experts, fast_paths=False)
    stack = simulate_belady_stack(
        jnp.asarray(pool_capacities, jnp.int32), jnp.asarray(requests.experts), jnp.asarray(requests.next_step),
        num_experts=num_experts,
    )
    for index, slow in enumerate(generic):
        for stack_field, slow_field in FIELDS:
            assert int(getattr(stack, stack_field)[index]) == getattr(slow, slow_field), (pool_capacities[index], stack_field)
        np.testing.assert_array_equal(np.asarray(stack.hits_per_layer[index]), slow.hits_per_layer)
        np.testing.assert_array_equal(np.asarray(stack.requests_per_layer[index]), slow.requests_per_layer)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_stack_random_small_pools(seed: int) -> None:
    trace = skewed_trace(seed, num_experts=7)
    requests = build_requests(trace)
    assert (requests.counts == 0).any(), "the trace should contain steps without requests"
    _assert_same(requests, trace.num_experts, feasible_capacities(requests, trace.num_experts))


@pytest.mark.parametrize("num_experts", [32, 45, 70])
def test_stack_random_pools_over_words(num_experts: int) -> None:
    """Pools of exactly one 32-bit word, of one and a half, and of three words of event bits."""
    trace = skewed_trace(num_experts, num_experts=num_experts, top_k=4, num_passes=60)
    requests = build_requests(trace)
    _assert_same(requests, num_experts, feasible_capacities(requests, num_experts))


def test_stack_sinks_the_furthest_item() -> None:
    """Hand-checked: with 2 slots, Belady keeps the expert requested again soonest."""
    # One layer. Passes request {0, 1}, {2}, {0}, {1}. At pass 1 (capacity 2) expert 2 evicts 1, whose next
    # request (pass 3) is later than 0's (pass 2). Pass 2 hits 0 and pass 3 misses 1.
    experts = np.array([[[0, 1]], [[2, -1]], [[0, -1]], [[1, -1]]], np.int32)
    next_step = np.array([[[2, 3]], [[NEVER, -1]], [[NEVER, -1]], [[NEVER, -1]]], np.int32)
    totals = simulate_belady_stack(jnp.asarray([2, 3], jnp.int32), jnp.asarray(experts), jnp.asarray(next_step), num_experts=3)
    assert totals.hits.tolist() == [1, 2]
    assert totals.compulsory.tolist() == [3, 3]
    assert totals.capacity.tolist() == [1, 0]
    assert totals.evictions.tolist() == [2, 0]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trace=small_traces())
def test_stack_matches_generic_property(trace) -> None:
    requests = build_requests(trace)
    _assert_same(requests, trace.num_experts, feasible_capacities(requests, trace.num_experts))


def test_stack_flame_prefix(flame_npz) -> None:
    """A prefix keeps next requests beyond its end, which must still rank before never-requested experts."""
    trace = load_flame_npz(flame_npz)
    requests = build_requests(trace)
    passes = 300
    prefix = requests._replace(
        experts=requests.experts[:passes], next_step=requests.next_step[:passes], counts=requests.counts[:passes]
    )
    needed = int(prefix.counts.max())
    _assert_same(prefix, trace.num_experts, [needed, needed + 1, (needed + trace.num_experts) // 2, trace.num_experts])


def test_stack_mixtral(mixtral_jsonl) -> None:
    trace = load_mixtral_jsonl(mixtral_jsonl)
    requests = build_requests(trace)
    _assert_same(requests, trace.num_experts, feasible_capacities(requests, trace.num_experts))


def test_run_sweep_takes_the_stack_path() -> None:
    """run_sweep's per-layer Belady results (stack path) equal the generic scan's."""
    trace = skewed_trace(5, num_experts=9)
    requests = build_requests(trace)
    smallest = int(requests.counts.max())
    configs = [SimConfig("belady", (smallest + extra) * trace.num_layers) for extra in (0, 2, 5)]
    fast = run_sweep(requests, configs, scope="per-layer", num_experts=trace.num_experts)
    slow = run_sweep(requests, configs, scope="per-layer", num_experts=trace.num_experts, fast_paths=False)
    for a, b in zip(fast, slow):
        assert (a.hits, a.compulsory_misses, a.capacity_misses, a.evictions) == (b.hits, b.compulsory_misses, b.capacity_misses, b.evictions)
        np.testing.assert_array_equal(a.hits_per_layer, b.hits_per_layer)


def test_keys_past_int32_take_the_generic_scan() -> None:
    next_step = np.full((3, 2, 1), NEVER, np.int32)
    assert fits_int32(next_step, num_experts=64)
    far = np.array([[[2**26, -1]]], np.int32)  # a next request at step 2**26, times 64 experts, passes 2**31
    assert not fits_int32(far, num_experts=64)


@pytest.mark.parametrize("max_rank", [3, 40])  # the bit-clearing branch, then the binary search
@pytest.mark.parametrize("num_positions", [32, 96])
def test_position_of_rth_event(max_rank: int, num_positions: int) -> None:
    rng = np.random.default_rng(max_rank + num_positions)
    events = rng.random((50, num_positions)) < rng.random((50, 1))
    ranks = rng.integers(0, max_rank + 1, 50)
    positions = jax.vmap(lambda row, rank: _position_of_rth(row, rank, max_rank))(jnp.asarray(events), jnp.asarray(ranks, jnp.int32))
    for row, rank, position in zip(events, ranks, np.asarray(positions)):
        true_positions = np.flatnonzero(row)
        if rank == 0:
            expected = 0
        elif rank <= len(true_positions):
            expected = true_positions[rank - 1]
        else:
            expected = num_positions
        assert position == expected, (rank, true_positions[:rank])

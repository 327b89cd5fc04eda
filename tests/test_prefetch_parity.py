"""Differential tests of prefetching and host misses: the jitted scan against reference_sim.simulate_prefetch.

Every registered eviction policy runs with each selection rule (all, top-k, mass), lookahead 1 and 2,
tight and loose budgets, and both miss modes. Outcomes, victims of both phases, the prefetched experts
in issue order and the source of every prefetch hit must be equal step for step.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest

import reference_sim as reference
from specmd_jax.policies import policy_names
from specmd_jax.prefetch.registry import PrefetchConfig
from specmd_jax.sim import SimConfig, run_sweep
from specmd_jax.sim.requests import mean_router_probabilities, request_presence
from specmd_jax.sim.sweep import SUBSTITUTE_CANDIDATES_PER_TOP_K
from specmd_jax.traces.flame import load_flame_npz
from test_reference_parity import RANDOM_SEEDS, cached_random_trace, first_passes, policy_variants

# (prefetcher whose table the test supplies, lookahead, budget or None, top_k, threshold)
PREFETCH_CASES = (
    ("oracle", 1, None, None, 0.9),
    ("oracle", 2, 3, None, 0.9),
    ("learned", 1, 2, 2, 0.9),
    ("learned", 2, None, 1, 0.9),
    ("score", 1, 4, None, 0.5),
    ("score", 2, None, None, 0.75),
)
CAPACITIES = (6, 9, 14)


def dyadic_scores(trace, lookahead: int, seed: int) -> np.ndarray:
    """Random scores in multiples of 1/64 with many ties and zeros, so float32 sums are exact."""
    rng = np.random.default_rng(seed)
    shape = (trace.num_passes, trace.num_layers, lookahead, trace.num_experts)
    return (rng.integers(0, 5, shape) * rng.integers(0, 2, shape) / 64).astype(np.float32)


def score_table(trace, name: str, lookahead: int, seed: int) -> np.ndarray:
    """The table the simulator uses for `name`: the oracle's is built from the requests, others supplied."""
    if name == "oracle":
        presence = request_presence(trace)
        T, L, E = presence.shape
        flat = presence.reshape(T * L, E).astype(np.float32)
        table = np.zeros((T * L, lookahead, E), np.float32)
        for j in range(1, lookahead + 1):
            table[: T * L - j, j - 1] = flat[j:]
        return table.reshape(T, L, lookahead, E)
    return dyadic_scores(trace, lookahead, seed)


def run_case(trace, policy, capacity, case, miss, seed, variant):
    name, lookahead, budget, top_k, threshold = case
    table = score_table(trace, name, lookahead, seed)
    prefetch = PrefetchConfig(name, lookahead=lookahead, top_k=top_k, threshold=threshold, budget=budget)
    config = SimConfig(policy, capacity, prefetch=prefetch, miss=miss, **variant)
    tables = None if name == "oracle" else {name: table}
    results, events = run_sweep(trace, [config], record_events=True, score_tables=tables)
    resolved_top_k = trace.metadata.top_k if top_k is None else top_k
    # No budget means no limit: at most every expert of every target step.
    resolved_budget = lookahead * trace.num_experts if budget is None else min(budget, lookahead * trace.num_experts)
    return config, table, results[0], events[config], resolved_top_k, resolved_budget


def assert_prefetch_equal(trace, expected, result, events, label):
    L = trace.num_layers
    base = expected.base
    for field in ("outcomes", "victims"):
        got, want = getattr(events, field), getattr(base, field)
        differs = np.any(got != want, axis=-1)
        if differs.any():
            p, l = (int(i) for i in np.argwhere(differs)[0])
            pytest.fail(f"{label}: {field} differ first at pass {p}, layer {l}: expected {want[p, l].tolist()}, got {got[p, l].tolist()}")
    for step, (want_items, want_victims) in enumerate(zip(expected.prefetched, expected.prefetch_victims)):
        p, l = divmod(step, L)
        got_items = [int(i) for i in events.prefetched[p, l] if i >= 0]
        got_victims = [int(i) for i in events.prefetch_victims[p, l] if i >= 0]
        assert got_items == want_items, f"{label}: prefetched items at step {step}"
        assert got_victims == want_victims, f"{label}: prefetch victims at step {step}"
    np.testing.assert_array_equal(events.prefetch_source, expected.prefetch_source, err_msg=f"{label}: prefetch sources")
    assert result.hits == base.hits, f"{label}: hits"
    assert result.compulsory_misses == base.compulsory, f"{label}: compulsory misses"
    assert result.capacity_misses == base.capacity, f"{label}: capacity misses"
    assert result.collision_misses == base.collision, f"{label}: collision misses"
    assert result.evictions == base.evictions, f"{label}: evictions"
    assert result.prefetches == expected.prefetches, f"{label}: prefetches"
    assert result.prefetch_hits == expected.prefetch_hits, f"{label}: prefetch hits"
    assert result.wasted_prefetches == expected.wasted, f"{label}: wasted prefetches"


@functools.lru_cache(maxsize=None)
def variants_of(policy):
    return tuple(tuple(sorted(v.items())) for v in policy_variants(policy)[:2])


@pytest.mark.parametrize("policy", policy_names())
@pytest.mark.parametrize("miss", ("demand", "host"))
def test_random_traces_prefetch(policy, miss):
    for seed in RANDOM_SEEDS[:2]:
        trace = cached_random_trace(seed)
        for case_index, case in enumerate(PREFETCH_CASES):
            capacity = CAPACITIES[(seed + case_index) % len(CAPACITIES)]
            for variant in variants_of(policy):
                variant = dict(variant)
                config, table, result, events, top_k, budget = run_case(trace, policy, capacity, case, miss, seed, variant)
                expected = reference.simulate_prefetch(
                    trace, policy, capacity, table, config.prefetch.prefetcher.selection,
                    top_k=top_k, threshold=case[4], budget=budget, params=config.params, seed=config.seed,
                    miss_mode=miss,
                )
                label = f"{policy} {variant} seed {seed} capacity {capacity} {case} {miss}"
                assert_prefetch_equal(trace, expected, result, events, label)


@pytest.mark.parametrize("policy", ("lru", "least-stale", "belady", "fifo"))
def test_interleaved_order_agrees_with_prefetch(policy):
    trace = cached_random_trace(RANDOM_SEEDS[0])
    case = PREFETCH_CASES[3]
    config, table, result, events, top_k, budget = run_case(trace, policy, 6, case, "demand", 0, {})
    expected = reference.simulate_prefetch(
        trace, policy, 6, table, "top-k", top_k=top_k, budget=budget, order="interleaved",
    )
    assert_prefetch_equal(trace, expected, result, events, f"{policy} interleaved")


@pytest.mark.parametrize("policy", ("lru", "least-stale", "belady"))
def test_flame_prefix_prefetch(flame_npz, policy):
    trace = first_passes(load_flame_npz(flame_npz), 150)
    for case in (("oracle", 1, 4, None, 0.9), ("learned", 2, 6, 6, 0.9)):
        config, table, result, events, top_k, budget = run_case(trace, policy, 24, case, "demand", 7, {})
        expected = reference.simulate_prefetch(
            trace, policy, 24, table, config.prefetch.prefetcher.selection, top_k=top_k, budget=budget,
        )
        assert_prefetch_equal(trace, expected, result, events, f"flame {policy} {case}")


def with_router_logits(trace, seed: int):
    """Return `trace` with random router logits in multiples of 1/4 (many ties), NaN in missing cells."""
    rng = np.random.default_rng(seed)
    logits = (rng.integers(-8, 8, (trace.num_tokens, trace.num_layers, trace.num_experts)) / 4).astype(np.float32)
    logits[trace.missing] = np.nan
    return dataclasses.replace(trace, router_logits=logits)


@pytest.mark.parametrize("policy", ("lru", "least-stale", "belady", "s3fifo"))
def test_substitute_misses_match_reference(policy):
    for seed in RANDOM_SEEDS[:2]:
        trace = with_router_logits(cached_random_trace(seed), seed)
        router = mean_router_probabilities(trace)
        # A zero budget (no prefetching, so many misses), then a random learned table.
        for case in (("oracle", 1, 0, None, 0.9), PREFETCH_CASES[2]):
            config, table, result, events, top_k, budget = run_case(trace, policy, 7, case, "substitute", seed, {})
            expected = reference.simulate_prefetch(
                trace, policy, 7, table, config.prefetch.prefetcher.selection, top_k=top_k, budget=budget,
                miss_mode="substitute", router_scores=router,
                substitute_candidates=SUBSTITUTE_CANDIDATES_PER_TOP_K * trace.metadata.top_k,
            )
            label = f"{policy} seed {seed} {case} substitute"
            assert_prefetch_equal(trace, expected, result, events, label)
            np.testing.assert_array_equal(events.substitute, expected.substitutes, err_msg=f"{label}: substitutes")
            assert result.substitutions == int((expected.substitutes >= 0).sum()), label
            assert result.substitutions > 0, label

"""Hand-worked cases for the SIEVE and S3-FIFO eviction policies (rules in docs/semantics.md).

The hand-worked traces have one layer, so an item's flat id is its expert id. A trace is a list of passes and each
pass lists the experts it requests. The comments under each case work the queues out by hand. Queues are
written oldest first, "f" is an S3-FIFO frequency and "m" is the number of victims of a step.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from specmd_jax.policies import get_policy, policy_names
from specmd_jax.policies.s3fifo import S3FifoParams, ghost_size, small_queue_min_items, small_share
from specmd_jax.sim import SimConfig, build_requests, run_sweep, simulate_batch
from specmd_jax.traces import PASS_DECODE, PASS_PREFILL, TraceMetadata, make_trace


def make_pass_trace(passes: list[list[int]], num_experts: int, num_layers: int = 1):
    """Build a trace whose pass p requests `passes[p]` at every layer, one top-1 token per expert."""
    sizes = [len(experts) for experts in passes]
    tokens = [expert for experts in passes for expert in experts]
    expert_ids = np.repeat(np.asarray(tokens, np.int16)[:, None, None], num_layers, axis=1)
    metadata = TraceMetadata("hand-worked", num_layers, num_experts, 1, "tests/test_policies_modern.py")
    return make_trace(
        expert_ids,
        metadata,
        pass_offsets=np.concatenate([[0], np.cumsum(sizes)]),
        pass_kind=np.asarray([PASS_DECODE if size == 1 else PASS_PREFILL for size in sizes], np.int8),
    )


def simulate_events(trace, policy_name: str, capacity: int, scope: str = "global", **params):
    """Run one configuration through `run_sweep` and return (hits, victims): per step, sorted flat ids."""
    config = SimConfig(policy_name, capacity, params)
    _, events_by_config = run_sweep(trace, [config], scope=scope, record_events=True)
    return events_as_lists(trace, events_by_config[config])


def events_as_lists(trace, events):
    """Convert `StepEvents` [T, L, R] of one configuration to per-step lists of hit and victim flat ids."""
    requests = build_requests(trace)
    experts = requests.experts.reshape(-1, requests.max_requests)
    outcomes = events.outcomes.reshape(-1, requests.max_requests)
    hits = []
    for step, (step_experts, step_outcomes) in enumerate(zip(experts, outcomes)):
        layer = step % trace.num_layers
        hits.append(sorted(int(layer * trace.num_experts + e) for e in step_experts[step_outcomes == 1]))
    victims = [[int(v) for v in row if v >= 0] for row in events.victims.reshape(-1, requests.max_requests)]
    return hits, victims


def expected_by_step(num_steps: int, entries: dict[int, list[int]]) -> list[list[int]]:
    """Expand {step: flat ids} into one list per step, empty where the step is not named."""
    return [entries.get(step, []) for step in range(num_steps)]


def one_expert_passes(experts: list[int]) -> list[list[int]]:
    """Make one pass per expert, each requesting only that expert."""
    return [[expert] for expert in experts]


# ---------------------------------------------------------------------------------------------------
# SIEVE


def test_sieve_passes_visited_and_wraps():
    # capacity 3
    # s0-s2  misses 0, 1, 2            queue [0 1 2], hand at 0 (the oldest)
    # s3     hit 0                     0 visited
    # s4     miss 3, m = 1             hand: 0 visited -> clear, pass; 1 unvisited -> victim 1,
    #                                  hand -> 2; queue [0 2 3]
    # s5, s6 hits 2, 3                 2 and 3 visited
    # s7     miss 4, m = 1             hand: 2 -> clear; 3 -> clear; wraps to 0 (cleared at s4) -> victim 0,
    #                                  hand -> 2; queue [2 3 4]
    # s8     miss 5, m = 1             hand: 2 (cleared at s7) -> victim 2, hand -> 3
    trace = make_pass_trace(one_expert_passes([0, 1, 2, 0, 3, 2, 3, 4, 5]), num_experts=8)
    hits, victims = simulate_events(trace, "sieve", 3)
    assert hits == expected_by_step(9, {3: [0], 5: [2], 6: [3]})
    assert victims == expected_by_step(9, {4: [1], 7: [0], 8: [2]})


def test_sieve_hand_wraps_after_newest_victim():
    # capacity 3
    # s0-s2  misses 0, 1, 2            queue [0 1 2], hand at 0
    # s3, s4 hits 0, 1                 0 and 1 visited
    # s5     miss 3, m = 1             hand: 0 -> clear; 1 -> clear; 2 -> victim 2, the newest item, so
    #                                  the hand wraps to the oldest (0); queue [0 1 3]
    # s6     miss 4, m = 1             hand: 0 (cleared) -> victim 0, hand -> 1. A hand left after the
    #                                  old position of 2 would have reached 3 instead.
    # s7     miss 5, m = 1             hand: 1 (cleared) -> victim 1, hand -> 3
    trace = make_pass_trace(one_expert_passes([0, 1, 2, 0, 1, 3, 4, 5]), num_experts=8)
    hits, victims = simulate_events(trace, "sieve", 3)
    assert hits == expected_by_step(8, {3: [0], 4: [1]})
    assert victims == expected_by_step(8, {5: [2], 6: [0], 7: [1]})


def test_sieve_full_turn_when_all_visited():
    # capacity 3
    # s0-s2  misses 0, 1, 2            queue [0 1 2], hand at 0
    # s3-s5  hits 0, 1, 2              all visited
    # s6     miss 3, m = 1             hand clears 0, 1, 2, wraps, and 0 is now unvisited -> victim 0,
    #                                  hand -> 1; queue [1 2 3]
    # s7     miss 4, m = 1             hand: 1 (cleared at s6) -> victim 1
    trace = make_pass_trace(one_expert_passes([0, 1, 2, 0, 1, 2, 3, 4]), num_experts=8)
    hits, victims = simulate_events(trace, "sieve", 3)
    assert hits == expected_by_step(8, {3: [0], 4: [1], 5: [2]})
    assert victims == expected_by_step(8, {6: [0], 7: [1]})


def test_sieve_passes_over_requested_items():
    # capacity 3, two requests per step
    # s0 {0,1}  misses                  queue [0 1], hand at 0
    # s1 {0,2}  hit 0 (visited), miss 2, m = 2 + 1 - 3 = 0; queue [0 1 2]
    # s2 {0,3}  hit 0, miss 3, m = 1    hand: 0 is requested -> passed over and keeps its bit;
    #                                   1 -> victim 1, hand -> 2; queue [0 2 3]
    # s3 {4,5}  misses, m = 3 + 2 - 3 = 2
    #                                   hand: 2 -> victim 2, hand -> 3; 3 -> victim 3, the newest, so the
    #                                   hand wraps to 0; queue [0 4 5], 0 still visited
    # s4 {4,6}  hit 4 (visited), miss 6, m = 1
    #                                   hand: 0 visited -> clear (its bit survived s2); 4 requested ->
    #                                   passed over, keeps its bit; 5 -> victim 5, the newest, so the hand
    #                                   wraps to 0; queue [0 4 6]
    # s5 {1,2}  misses, m = 2           hand: 0 (cleared at s4) -> victim 0, hand -> 4; 4 visited (bit
    #                                   kept at s4) -> clear; 6 -> victim 6
    trace = make_pass_trace([[0, 1], [0, 2], [0, 3], [4, 5], [4, 6], [1, 2]], num_experts=8)
    hits, victims = simulate_events(trace, "sieve", 3)
    assert hits == expected_by_step(6, {1: [0], 2: [0], 4: [4]})
    assert victims == expected_by_step(6, {2: [1], 3: [2, 3], 4: [5], 5: [0, 6]})


# ---------------------------------------------------------------------------------------------------
# S3-FIFO


def test_s3fifo_promotes_small_to_main():
    # capacity 4, small_fraction 0.5: S is taken from while it contains >= 2 items; ghost size 4 - 2 = 2
    # s0-s3  misses 0-3                S [0 1 2 3]
    # s4     hit 0                     f0 = 1
    # s5     miss 4, m = 1             |S| = 4 >= 2: 0 has f 1 >= 1 -> moves to M with f 0;
    #                                  |S| = 3: 1 has f 0 -> victim 1, G [1]; S [2 3 4], M [0]
    # s6-s9  hits 2, 3, 0, 0           f2 = 1, f3 = 1, f0 = 2
    # s10    miss 5, m = 1             |S| = 3: 2 -> M (f 0); |S| = 2: 3 -> M (f 0); |S| = 1 < 2, so M:
    #                                  0 has f 2 -> newest end of M with f 1; 2 has f 0 -> victim 2, which
    #                                  does not enter G; S [4 5], M [3 0]
    # s11    miss 2, m = 1             2 is not in G, so it goes to S. |S| = 2: 4 -> victim, G [1 4];
    #                                  S [5 2]
    # s12    miss 6, m = 1             |S| = 2: 5 -> victim, G [1 4 5] -> drops 1; S [2 6]
    # s13    miss 7, m = 1             |S| = 2: 2 -> victim. Had 2 entered G at s10, s11 would have put it
    #                                  in M and s12 would have evicted 3 from M.
    trace = make_pass_trace(one_expert_passes([0, 1, 2, 3, 0, 4, 2, 3, 0, 0, 5, 2, 6, 7]), num_experts=8)
    hits, victims = simulate_events(trace, "s3fifo", 4, small_fraction=0.5)
    assert hits == expected_by_step(14, {4: [0], 6: [2], 7: [3], 8: [0], 9: [0]})
    assert victims == expected_by_step(14, {5: [1], 10: [2], 11: [4], 12: [5], 13: [2]})


def test_s3fifo_main_reinsertion_lowers_frequency():
    # capacity 3, small_fraction 0.5: S is taken from while |S| >= 1.5, that is |S| >= 2
    # s0     miss 0; s1-s3 hits 0      f0 = 3
    # s4, s5 misses 1, 2               S [0 1 2]
    # s6     miss 3, m = 1             0 (f 3) -> M with f 0; |S| = 2: 1 -> victim; S [2 3], M [0]
    # s7-s10 four hits on 0            f0 = 3 (capped at 3)
    # s11    miss 4                    |S| = 2: 2 -> victim; S [3 4]
    # s12    hit 3                     f3 = 1
    # s13    miss 5                    3 -> M (f 0); |S| = 1 < 2, so M: 0 (f 3) -> newest end, f 2;
    #                                  3 (f 0) -> victim 3; S [4 5], M [0]
    # s14, s15  hit 4, miss 6          4 -> M; 0 (f 2) -> f 1; victim 4; S [5 6]
    # s16, s17  hit 5, miss 7          5 -> M; 0 (f 1) -> f 0; victim 5; S [6 7]
    # s18, s19  hit 6, miss 8          6 -> M; 0 has f 0 -> victim 0 at its fourth turn at the M head
    passes = [0, 0, 0, 0, 1, 2, 3, 0, 0, 0, 0, 4, 3, 5, 4, 6, 5, 7, 6, 8]
    trace = make_pass_trace(one_expert_passes(passes), num_experts=10)
    hits, victims = simulate_events(trace, "s3fifo", 3, small_fraction=0.5)
    expected_hits = {1: [0], 2: [0], 3: [0], 7: [0], 8: [0], 9: [0], 10: [0], 12: [3], 14: [4], 16: [5], 18: [6]}
    assert hits == expected_by_step(20, expected_hits)
    assert victims == expected_by_step(20, {6: [1], 11: [2], 13: [3], 15: [4], 17: [5], 19: [0]})


def test_s3fifo_ghost_hit_enters_main():
    # capacity 4, small_fraction 0.5: |S| >= 2 takes from S; ghost size 4 - round(2.0) = 2
    # s0-s3  misses 0-3                S [0 1 2 3]
    # s4-s6  misses 4, 5, 6            victims 0, 1, 2 from S; G [0 1 2] -> drops 0 -> G [1 2]
    # s7     miss 2                    victim 3 first, G [1 2 3] -> drops 1 -> G [2 3]; then 2 is in G,
    #                                  so it goes to M and leaves G: S [4 5 6], M [2], G [3]
    # s8     miss 0                    victim 4, G [3 4]; 0 was forgotten at s6, so it goes to S
    # s9     miss 1                    victim 5, G [3 4 5] -> [4 5]; 1 was forgotten at s7 -> S
    # s10    miss 7                    victim 6, G [5 6]; S [0 1 7], M [2]
    # s11    miss 3                    |S| = 3: victim 0. With 2 in S the victim would be 2; with 0 in M
    #                                  (no ghost limit) S would be [1 7] and M would lose 2.
    trace = make_pass_trace(one_expert_passes([0, 1, 2, 3, 4, 5, 6, 2, 0, 1, 7, 3]), num_experts=8)
    hits, victims = simulate_events(trace, "s3fifo", 4, small_fraction=0.5)
    assert hits == expected_by_step(12, {})
    assert victims == expected_by_step(12, {4: [0], 5: [1], 6: [2], 7: [3], 8: [4], 9: [5], 10: [6], 11: [0]})


def test_s3fifo_ghost_size_limit():
    # capacity 4, small_fraction 0.25: S is taken from while |S| >= 1; ghost size 4 - round(1.0) = 3
    # s0-s3  misses 0-3                S [0 1 2 3]
    # s4-s7  misses 4-7                victims 0-3; G [0 1 2 3] -> drops 0 -> G [1 2 3]
    # s8     miss 0                    victim 4, G [2 3 4]; 0 is not in G -> S [5 6 7 0]
    # s9     miss 3                    victim 5, G [3 4 5]; 3 is the oldest entry but still in G ->
    #                                  M [3], G [4 5]; S [6 7 0]
    # s10    miss 2                    victim 6, G [4 5 6]; 2 was forgotten at s9 -> S [7 0 2]
    # s11-s13 misses 8, 9, 10          victims 7, 0, 2 from S; 3 stays in M
    # A limit of 2 would have forgotten 3 at s9 (victim at s13: 3); a limit of 4 would have kept 2 at s10
    # (victim at s13: 8).
    trace = make_pass_trace(one_expert_passes([0, 1, 2, 3, 4, 5, 6, 7, 0, 3, 2, 8, 9, 10]), num_experts=12)
    hits, victims = simulate_events(trace, "s3fifo", 4, small_fraction=0.25)
    assert hits == expected_by_step(14, {})
    expected = {4: [0], 5: [1], 6: [2], 7: [3], 8: [4], 9: [5], 10: [6], 11: [7], 12: [0], 13: [2]}
    assert victims == expected_by_step(14, expected)


def test_s3fifo_small_count_includes_requested():
    # capacity 3, small_fraction 0.5: S is taken from while |S| >= 1.5
    # s0 {0,2}    misses                S [0 2]
    # s1 {0,2,4}  hits 0, 2 (f 1), miss 4, m = 0; S [0 2 4]
    # s2 {1,2,4}  hits 2 (f 2), 4 (f 1), miss 1, m = 1
    #             |S| = 3: the oldest unrequested item of S is 0 (f 1) -> M with f 0; |S| = 2 >= 1.5 but
    #             2 and 4 are requested, so M: 0 (f 0) -> victim 0, not into G; S [2 4 1]
    # s3 {0,2}    hit 2 (f 3), miss 0, m = 1
    #             |S| = 3: 4 (f 1) -> M with f 0; |S| = 2 counts the requested 2, so S again:
    #             1 (f 0) -> victim 1. Counting only unrequested items (1) would have evicted 4 from M.
    trace = make_pass_trace([[0, 2], [0, 2, 4], [1, 2, 4], [0, 2]], num_experts=5)
    hits, victims = simulate_events(trace, "s3fifo", 3, small_fraction=0.5)
    assert hits == expected_by_step(4, {1: [0, 2], 2: [2, 4], 3: [2]})
    assert victims == expected_by_step(4, {2: [0], 3: [1]})


def test_s3fifo_small_when_main_all_requested():
    # capacity 3, small_fraction 0.5: |S| >= 1.5 takes from S; ghost size 3 - round(1.5) = 1
    # s0 {1,4}    misses                S [1 4]
    # s1 {0,1,4}  hits 1, 4 (f 1), miss 0, m = 0; S [1 4 0]
    # s2 {3}      m = 1: 1 -> M, 4 -> M (f 0 each); |S| = 1, so M: 1 (f 0) -> victim 1; S [0 3], M [4]
    # s3 {1,2,4}  hit 4, misses 1 and 2, m = 3 + 2 - 3 = 2
    #             |S| = 2: 0 -> victim, G [0]; |S| = 1 < 1.5 but M contains only the requested 4, so S:
    #             3 -> victim, G [0 3] -> drops 0
    trace = make_pass_trace([[1, 4], [0, 1, 4], [3], [1, 2, 4]], num_experts=5)
    hits, victims = simulate_events(trace, "s3fifo", 3, small_fraction=0.5)
    assert hits == expected_by_step(4, {1: [1, 4], 3: [4]})
    assert victims == expected_by_step(4, {2: [1], 3: [0, 3]})


def test_s3fifo_ghost_lookup_after_victims():
    # capacity 4, small_fraction 0.5: |S| >= 2 takes from S; ghost size 2
    # s0 {0,3,5}  misses                S [0 3 5]
    # s1 {1,2}    m = 1: victim 0, G [0]; S [3 5 1 2]
    # s2 {4}      victim 3, G [0 3]; S [5 1 2 4]
    # s3 {0,3}    both in G when the step starts. m = 2: victim 5, G [0 3 5] -> drops 0; victim 1,
    #             G [3 5 1] -> drops 3. The misses are inserted after the victims, so neither is in G
    #             any more and both go to S: S [2 4 0 3]
    # s4-s6       misses 6, 7, 8: victims 2, 4, 0 from S. Had 0 and 3 gone to M, S would be [2 4] and
    #             s6 would evict 6.
    trace = make_pass_trace([[0, 3, 5], [1, 2], [4], [0, 3], [6], [7], [8]], num_experts=9)
    hits, victims = simulate_events(trace, "s3fifo", 4, small_fraction=0.5)
    assert hits == expected_by_step(7, {})
    assert victims == expected_by_step(7, {1: [0], 2: [3], 3: [1, 5], 4: [2], 5: [4], 6: [0]})


@pytest.mark.parametrize(
    ("small_fraction", "capacity", "expected_min_items", "expected_ghosts"),
    [
        (0.1, 10, 1, 9),
        (0.1, 5, 1, 4),  # 0.5 rounds up to 1
        (0.5, 5, 3, 2),  # 2.5 rounds up to 3 (round-half-even would give 2)
        (0.25, 10, 3, 7),  # 2.5 rounds up to 3
        (0.15, 100, 15, 85),  # float32 gives 15.000001, which would need 16 items
        (0.21, 150, 32, 118),  # 31.5 rounds up to 32; float32 gives 31.499998
        (0.123457, 1000, 124, 877),  # six decimals: 123.457
        (1.0, 8, 8, 0),
        (0.0, 8, 0, 8),
        (1.5, 4, 4, 0),  # clipped to 1
    ],
)
def test_s3fifo_small_share_table(small_fraction, capacity, expected_min_items, expected_ghosts):
    fraction, slots = jnp.float32(small_fraction), jnp.int32(capacity)
    assert int(small_queue_min_items(fraction, slots)) == expected_min_items
    assert int(ghost_size(fraction, slots)) == expected_ghosts


def test_s3fifo_small_share_exact_decimal():
    # Every fraction with up to 3 decimals and every capacity up to 2000, against exact rationals.
    fractions = np.arange(1001) / 1000
    capacities = np.arange(1, 2001)
    grid_fractions = jnp.asarray(np.repeat(fractions, len(capacities)), jnp.float32)
    grid_capacities = jnp.asarray(np.tile(capacities, len(fractions)), jnp.int32)
    min_items = np.asarray(small_queue_min_items(grid_fractions, grid_capacities)).reshape(len(fractions), -1)
    ghosts = np.asarray(ghost_size(grid_fractions, grid_capacities)).reshape(len(fractions), -1)
    # With k thousandths, ceil(k / 1000 x C) and floor(k / 1000 x C + 1/2) in exact integer arithmetic.
    scaled = np.arange(1001)[:, None] * capacities[None, :]
    np.testing.assert_array_equal(min_items, -(-scaled // 1000))
    np.testing.assert_array_equal(ghosts, capacities[None, :] - (scaled + 500) // 1000)

    # float32 keeps every fraction with up to 6 decimals apart: with capacity 1 the remainder in
    # millionths is the fraction's own digits.
    micros = np.arange(1_000_000)
    whole, remainder = small_share(jnp.asarray(micros / 1_000_000, jnp.float32), jnp.int32(1))
    np.testing.assert_array_equal(np.asarray(whole), 0)
    np.testing.assert_array_equal(np.asarray(remainder), micros)


# ---------------------------------------------------------------------------------------------------
# Sweeps, scopes and determinism


def random_trace(seed: int, num_passes: int = 60, num_layers: int = 2, num_experts: int = 8, top_k: int = 2):
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(num_experts, 0.5))
    expert_ids = np.stack(
        [[rng.choice(num_experts, top_k, replace=False, p=weights) for _ in range(num_layers)] for _ in range(num_passes)]
    )
    return make_trace(expert_ids, TraceMetadata("random", num_layers, num_experts, top_k, "tests/test_policies_modern.py"))


def test_s3fifo_small_fraction_sweep_one_call():
    trace = random_trace(seed=3)
    fractions = [0.1, 0.25, 0.5, 0.75]
    configs = [SimConfig("s3fifo", 6, {"small_fraction": fraction}) for fraction in fractions]
    results, events_by_config = run_sweep(trace, configs, scope="global", record_events=True)
    hit_counts = []
    for config, result in zip(configs, results):
        alone = simulate_events(trace, "s3fifo", 6, small_fraction=dict(config.params)["small_fraction"])
        assert events_as_lists(trace, events_by_config[config]) == alone, config.label
        assert result.hits == sum(len(step_hits) for step_hits in alone[0]), config.label
        hit_counts.append(result.hits)
    # The fractions change the outcome, so the configurations did not collapse into one.
    assert len(set(hit_counts)) > 1

    # Other values of the same shape reuse the compiled sweep.
    run_sweep(trace, configs, scope="global", record_events=True)
    compiled = simulate_batch._cache_size()
    other_fractions = [SimConfig("s3fifo", 6, {"small_fraction": f}) for f in (0.2, 0.3, 0.6, 0.9)]
    run_sweep(trace, other_fractions, scope="global", record_events=True)
    assert simulate_batch._cache_size() == compiled


@pytest.mark.parametrize("policy_name", ["sieve", "s3fifo"])
def test_modern_policies_deterministic(policy_name):
    trace = random_trace(seed=5)
    first = simulate_events(trace, policy_name, 7)
    second = simulate_events(trace, policy_name, 7)
    assert first == second
    totals_first = run_sweep(trace, [SimConfig(policy_name, 7)], scope="global")[0]
    totals_second = run_sweep(trace, [SimConfig(policy_name, 7)], scope="global")[0]
    for field in dataclasses.fields(totals_first):
        first_value, second_value = getattr(totals_first, field.name), getattr(totals_second, field.name)
        np.testing.assert_array_equal(first_value, second_value, err_msg=field.name)
    assert totals_first.hits == sum(len(step_hits) for step_hits in first[0])
    assert totals_first.evictions == sum(len(step_victims) for step_victims in first[1])


@pytest.mark.parametrize("policy_name", ["sieve", "s3fifo"])
def test_modern_policies_per_layer_pools(policy_name):
    # A per-layer pool receives only its layer's requests, so it must match a one-layer global run.
    trace = random_trace(seed=7, num_layers=2)
    per_layer_hits, per_layer_victims = simulate_events(trace, policy_name, 8, scope="per-layer")
    requests = build_requests(trace)
    for layer in range(trace.num_layers):
        passes = [[int(e) for e in requests.experts[p, layer] if e >= 0] for p in range(trace.num_passes)]
        layer_hits, layer_victims = simulate_events(make_pass_trace(passes, trace.num_experts), policy_name, 4)
        offset = layer * trace.num_experts
        assert [sorted(v - offset for v in step) for step in per_layer_hits[layer :: trace.num_layers]] == layer_hits
        assert [sorted(v - offset for v in step) for step in per_layer_victims[layer :: trace.num_layers]] == layer_victims


def test_modern_policies_registered():
    assert {"sieve", "s3fifo"} <= set(policy_names())
    assert get_policy("sieve").default_params() == ()
    assert get_policy("s3fifo").default_params() == S3FifoParams(small_fraction=0.1, promote_threshold=1)

"""Differential tests: the jitted simulator against the plain-Python reference in reference_sim.py.

Every registered policy is checked in both scopes, step for step: the outcome of every request slot and
the victims of every step must be equal, and so must the totals.

The reference can process a step in two orders (see reference_sim.simulate). "victims-first" follows
steps 3 and 4 of docs/semantics.md literally and must always match. "interleaved" evicts one victim
before each insertion into a full pool. The contract states that both orders agree for every policy but
SIEVE and S3-FIFO (see ORDER_SENSITIVE_POLICIES). For those two the interleaved cases are strict
expected failures, which checks that the orders really differ.

The simulator compiles once per (policy, scope, request-tensor shape), so all random traces share one
shape, and the real traces add three: FLAME, its first 400 passes, and Mixtral.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import reference_sim as reference
from specmd_jax.policies import policy_names
from specmd_jax.sim import SimConfig, run_sweep
from specmd_jax.traces.flame import load_flame_npz
from specmd_jax.traces.mixtral import load_mixtral_jsonl
from specmd_jax.traces.trace import PASS_DECODE, PASS_PREFILL, Trace, TraceMetadata, make_trace

SCOPES = ("global", "per-layer")

# Policies whose result depends on whether a step's insertions come before or after its victims. For
# them the "interleaved" and "victims-first" orders differ (see ORDER_COUNTEREXAMPLES).
#   sieve   after the newest old item is evicted, the hand points at the next newer item. In the
#           interleaved order that can be an item inserted earlier in the step, and the hand stays there
#           for the next step. Choosing all victims first makes it wrap to the oldest item instead.
#   s3fifo  a missed item is looked up in G when it is inserted. Only in the victims-first order can a
#           victim of the same step push it out of G first. Also, the rule "S holds at least
#           small_fraction x capacity items" counts items inserted earlier in the step only when
#           interleaved.
ORDER_SENSITIVE_POLICIES = {"sieve", "s3fifo"}
ORDER_CLAIM_REASON = (
    "for this policy choosing all victims first differs from interleaving one eviction with each "
    "insertion (see ORDER_SENSITIVE_POLICIES); the simulator follows the contract: victims first"
)

# Random traces: 30 passes, 3 layers, 8 experts, top-2, prefills of up to 3 tokens. Pass 0 is a 3-token
# prefill with 6 distinct experts at layer 0, so every trace has R = 6 request slots and one shape.
RANDOM_SEEDS = (0, 1, 2, 3, 4)
RANDOM_PASSES, RANDOM_LAYERS, RANDOM_EXPERTS, RANDOM_TOP_K, RANDOM_MAX_PREFILL = 30, 3, 8, 2, 3
RANDOM_MAX_REQUESTS = RANDOM_MAX_PREFILL * RANDOM_TOP_K
# Global: the tightest feasible capacity (6), then looser ones. Per-layer: 6 slots per layer (the
# tightest), 6 again from floor(20 / 3), then 7 and 8 (8 = every expert, so nothing is ever evicted).
RANDOM_CAPACITIES = {"global": (6, 7, 10, 16), "per-layer": (18, 20, 21, 24)}

# Real traces. FLAME has 2048 one-token passes of 8 layers x 64 experts, top-6; Mixtral has 338 passes
# of 32 layers x 8 experts, top-2, with missing cells. The first capacity of each list is the tightest.
# Only each policy's default variant runs on them, to keep the reference's run time low.
FULL_FLAME_POLICIES = {"lru", "least-stale", "belady"}
FLAME_PREFIX_PASSES = 400
FLAME_CAPACITIES = {"global": (6, 64), "per-layer": (48, 96)}
MIXTRAL_CAPACITIES = {"global": (2, 48), "per-layer": (64, 96)}


def policy_variants(policy: str) -> list[dict]:
    """Hyper-parameters and seeds to test for `policy`, as SimConfig keyword arguments."""
    if policy == "random":
        return [{"seed": 0}, {"seed": 1}]
    if policy == "s3fifo":
        # 0.25 x 10 = 2.5 checks that round() in the ghost limit rounds halves up, and 0.3 x 10 = 3
        # puts the S threshold exactly on an item count.
        return [
            {},
            {"params": {"small_fraction": 0.25}},
            {"params": {"small_fraction": 0.5, "promote_threshold": 2}},
            {"params": {"small_fraction": 0.3}},
        ]
    return [{}]


def make_configs(policy: str, capacities, all_variants: bool = True) -> list[SimConfig]:
    """Configurations of every capacity with every variant, or with the first (default) variant only."""
    variants = policy_variants(policy) if all_variants else policy_variants(policy)[:1]
    return [SimConfig(policy, capacity, **variant) for capacity in capacities for variant in variants]


def random_trace(seed: int) -> Trace:
    """Build a small trace with skewed routing, prefill passes, missing cells and empty steps."""
    rng = np.random.default_rng(seed)
    passes, layers, experts, top_k = RANDOM_PASSES, RANDOM_LAYERS, RANDOM_EXPERTS, RANDOM_TOP_K
    tokens_per_pass = np.where(rng.random(passes) < 0.7, 1, rng.integers(2, RANDOM_MAX_PREFILL + 1, passes))
    tokens_per_pass[0] = RANDOM_MAX_PREFILL
    pass_offsets = np.concatenate([[0], np.cumsum(tokens_per_pass)])
    num_tokens = int(pass_offsets[-1])

    # Each layer prefers its experts in a random order with Zipf-like weights, so items get reused.
    expert_ids = np.empty((num_tokens, layers, top_k), np.int64)
    for layer in range(layers):
        weights = 1.0 / np.arange(1, experts + 1) ** 1.2
        weights = weights[rng.permutation(experts)]
        weights /= weights.sum()
        for token in range(num_tokens):
            expert_ids[token, layer] = rng.choice(experts, top_k, replace=False, p=weights)
    expert_ids[:RANDOM_MAX_PREFILL, 0] = rng.permutation(experts)[:RANDOM_MAX_REQUESTS].reshape(RANDOM_MAX_PREFILL, top_k)

    # Scattered missing cells, one step with every cell missing, and one pass missing in every layer.
    missing = rng.random((num_tokens, layers)) < 0.1
    missing[:RANDOM_MAX_PREFILL, 0] = False
    empty_step_pass, empty_pass = rng.choice(np.arange(1, passes), 2, replace=False)
    missing[pass_offsets[empty_step_pass] : pass_offsets[empty_step_pass + 1], rng.integers(layers)] = True
    missing[pass_offsets[empty_pass] : pass_offsets[empty_pass + 1], :] = True
    expert_ids[missing] = -1

    pass_kind = np.where(tokens_per_pass > 1, PASS_PREFILL, PASS_DECODE)
    pass_kind[0] = PASS_PREFILL
    metadata = TraceMetadata("random-parity", layers, experts, top_k, f"random_trace(seed={seed})", synthetic=True)
    return make_trace(expert_ids, metadata, missing=missing, pass_offsets=pass_offsets, pass_kind=pass_kind)


def first_passes(trace: Trace, num_passes: int) -> Trace:
    """Return the trace cut after its first `num_passes` passes."""
    num_tokens = int(trace.pass_offsets[num_passes])
    return make_trace(
        trace.expert_ids[:num_tokens],
        trace.metadata,
        missing=trace.missing[:num_tokens],
        pass_offsets=trace.pass_offsets[: num_passes + 1],
        pass_kind=trace.pass_kind[:num_passes],
        pass_sequence=trace.pass_sequence[:num_passes],
    )


@functools.lru_cache(maxsize=None)
def cached_random_trace(seed: int) -> Trace:
    return random_trace(seed)


@functools.lru_cache(maxsize=None)
def simulate_random(seed: int, policy: str, scope: str):
    configs = make_configs(policy, RANDOM_CAPACITIES[scope])
    results, events = run_sweep(cached_random_trace(seed), configs, scope=scope, record_events=True)
    return configs, results, events


def describe_step(trace: Trace, expected, events, p: int, layer: int) -> str:
    first, stop = trace.pass_offsets[p], trace.pass_offsets[p + 1]
    routed = trace.expert_ids[first:stop, layer].tolist()
    return (
        f"first difference at pass {p}, layer {layer} (step {p * trace.num_layers + layer}); routing {routed}; "
        f"outcomes expected {expected.outcomes[p, layer].tolist()}, got {events.outcomes[p, layer].tolist()}; "
        f"victims expected {expected.victims[p, layer].tolist()}, got {events.victims[p, layer].tolist()}"
    )


def assert_events_equal(trace: Trace, expected, events, label: str) -> None:
    """Assert equal outcomes and victims; a failure names the first step that differs."""
    assert events.outcomes.shape == expected.outcomes.shape, f"{label}: outcome shapes differ"
    assert events.victims.shape == expected.victims.shape, f"{label}: victim shapes differ"
    differs = np.any(events.outcomes != expected.outcomes, axis=-1) | np.any(events.victims != expected.victims, axis=-1)
    if differs.any():
        p, layer = (int(i) for i in np.argwhere(differs)[0])
        pytest.fail(f"{label}: {describe_step(trace, expected, events, p, layer)}")


def assert_totals_equal(expected, result, label: str) -> None:
    assert result.requests == expected.requests, f"{label}: requests"
    assert result.hits == expected.hits, f"{label}: hits"
    assert result.compulsory_misses == expected.compulsory, f"{label}: compulsory misses"
    assert result.capacity_misses == expected.capacity, f"{label}: capacity misses"
    assert result.collision_misses == expected.collision, f"{label}: collision misses"
    assert result.evictions == expected.evictions, f"{label}: evictions"
    np.testing.assert_array_equal(result.requests_per_layer, expected.requests_per_layer, err_msg=f"{label}: requests per layer")
    np.testing.assert_array_equal(result.hits_per_layer, expected.hits_per_layer, err_msg=f"{label}: hits per layer")


def check_against_reference(trace: Trace, configs, results, events, scope: str, order: str) -> None:
    for config, result in zip(configs, results):
        expected = reference.simulate(
            trace, config.policy, config.capacity, scope, params=config.params, seed=config.seed, order=order
        )
        label = f"{trace.name} {config.label} seed={config.seed} capacity={config.capacity} {scope} ({order})"
        assert_events_equal(trace, expected, events[config], label)
        assert_totals_equal(expected, result, label)


def order_claim_params() -> list:
    return [
        pytest.param(
            name,
            marks=pytest.mark.xfail(strict=True, reason=ORDER_CLAIM_REASON) if name in ORDER_SENSITIVE_POLICIES else (),
        )
        for name in policy_names()
    ]


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("policy", policy_names())
def test_random_traces_victims_first(policy, scope):
    for seed in RANDOM_SEEDS:
        configs, results, events = simulate_random(seed, policy, scope)
        check_against_reference(cached_random_trace(seed), configs, results, events, scope, "victims-first")


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("policy", order_claim_params())
def test_random_traces_interleaved(policy, scope):
    for seed in RANDOM_SEEDS:
        configs, results, events = simulate_random(seed, policy, scope)
        check_against_reference(cached_random_trace(seed), configs, results, events, scope, "interleaved")


def test_random_trace_has_fixed_shape():
    # Every random trace must share one request-tensor shape, or each would compile anew.
    for seed in RANDOM_SEEDS:
        expected = reference.simulate(cached_random_trace(seed), "lru", RANDOM_CAPACITIES["global"][0], "global")
        assert expected.outcomes.shape == (RANDOM_PASSES, RANDOM_LAYERS, RANDOM_MAX_REQUESTS)
        assert cached_random_trace(seed).num_missing_cells > 0


def test_reference_random_draws_match_eager_jax():
    for seed, step, pool_size in [(0, 0, 24), (1, 17, 8), (5, 1234, 24)]:
        key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
        eager = jax.random.randint(key, (pool_size,), 0, 2**31 - 1, dtype="int32")
        assert reference.random_draws(seed, step, pool_size) == np.asarray(eager).tolist()


def test_reference_draw_table_matches_eager_draws():
    table = reference.random_draw_table(3, 1300, 24)
    for step in (0, 1, 17, 1299):
        assert table[step].tolist() == reference.random_draws(3, step, 24)


# Minimal traces on which the two orders differ, found by exhaustive search over traces of up to 4
# passes: one layer of 4 experts, top-1, and each tuple is the expert set of one pass (a prefill when
# it has several experts), global scope, default hyper-parameters.
ORDER_COUNTEREXAMPLES = {
    # Capacity 3. Before pass 2 the queue is [0 (visited), 1]. Victims first: the hand clears 0, evicts 1
    # and wraps to the oldest item, so pass 3 (a miss on 1) evicts 0. Interleaved: 2 is inserted first,
    # so after evicting 1 the hand points at 2, and pass 3 evicts 2.
    "sieve": (((0,), (0, 1), (2, 3), (1,)), 3),
    # Capacity 2, so G keeps 2 ids. Victims first: pass 2 evicts 1 and 2 from S, which pushes 0 out of
    # G = [0, 1, 2] before 0 is inserted, so 0 enters S and pass 3 evicts it. Interleaved: 0 is inserted
    # while still in G, so it enters M, and pass 3 evicts 3 from S instead.
    "s3fifo": (((0,), (1, 2), (0, 3), (1,)), 2),
}


def trace_of_expert_sets(expert_sets, num_experts: int = 4) -> Trace:
    """Build a one-layer, top-1 trace in which pass p requests exactly the experts of expert_sets[p]."""
    expert_ids = [[[expert]] for experts in expert_sets for expert in experts]
    pass_offsets = np.concatenate([[0], np.cumsum([len(experts) for experts in expert_sets])])
    pass_kind = [PASS_PREFILL if len(experts) > 1 else PASS_DECODE for experts in expert_sets]
    metadata = TraceMetadata("order-counterexample", 1, num_experts, 1, "hand-built", synthetic=True)
    return make_trace(np.asarray(expert_ids), metadata, pass_offsets=pass_offsets, pass_kind=np.asarray(pass_kind))


def simulate_counterexample(policy: str):
    expert_sets, capacity = ORDER_COUNTEREXAMPLES[policy]
    trace = trace_of_expert_sets(expert_sets)
    configs = [SimConfig(policy, capacity)]
    results, events = run_sweep(trace, configs, scope="global", record_events=True)
    return trace, configs, results, events


@pytest.mark.parametrize("policy", sorted(ORDER_COUNTEREXAMPLES))
def test_order_counterexample_orders_differ(policy):
    expert_sets, capacity = ORDER_COUNTEREXAMPLES[policy]
    trace = trace_of_expert_sets(expert_sets)
    interleaved = reference.simulate(trace, policy, capacity, "global", order="interleaved")
    victims_first = reference.simulate(trace, policy, capacity, "global", order="victims-first")
    assert not np.array_equal(interleaved.victims, victims_first.victims)


@pytest.mark.parametrize("policy", sorted(ORDER_COUNTEREXAMPLES))
def test_order_counterexample_victims_first(policy):
    trace, configs, results, events = simulate_counterexample(policy)
    check_against_reference(trace, configs, results, events, "global", "victims-first")


@pytest.mark.parametrize("policy", [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=ORDER_CLAIM_REASON)) for name in sorted(ORDER_COUNTEREXAMPLES)])
def test_order_counterexample_interleaved(policy):
    trace, configs, results, events = simulate_counterexample(policy)
    check_against_reference(trace, configs, results, events, "global", "interleaved")


def flame_trace_for(policy: str, flame_path) -> Trace:
    trace = cached_flame(str(flame_path))
    return trace if policy in FULL_FLAME_POLICIES else cached_flame_prefix(str(flame_path))


@functools.lru_cache(maxsize=None)
def cached_flame(path: str) -> Trace:
    return load_flame_npz(path)


@functools.lru_cache(maxsize=None)
def cached_flame_prefix(path: str) -> Trace:
    return first_passes(cached_flame(path), FLAME_PREFIX_PASSES)


@functools.lru_cache(maxsize=None)
def cached_mixtral(path: str) -> Trace:
    return load_mixtral_jsonl(path)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("policy", policy_names())
def test_flame_trace(policy, scope, flame_npz):
    trace = flame_trace_for(policy, flame_npz)
    configs = make_configs(policy, FLAME_CAPACITIES[scope], all_variants=False)
    results, events = run_sweep(trace, configs, scope=scope, record_events=True)
    check_against_reference(trace, configs, results, events, scope, "victims-first")


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("policy", policy_names())
def test_mixtral_trace(policy, scope, mixtral_jsonl):
    trace = cached_mixtral(str(mixtral_jsonl))
    assert trace.num_missing_cells > 0
    configs = make_configs(policy, MIXTRAL_CAPACITIES[scope], all_variants=False)
    results, events = run_sweep(trace, configs, scope=scope, record_events=True)
    check_against_reference(trace, configs, results, events, scope, "victims-first")

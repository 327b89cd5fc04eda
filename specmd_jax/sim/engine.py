"""The simulator's one scan loop: a cache pool stepped through the requests of a trace.

The step semantics are written down in docs/semantics.md. A scan step handles all requests of one
(pass, layer) at once, because on XLA:CPU each scan step costs about a microsecond whatever it does.

Scopes:
  global     one pool of N = L * E items; the scan runs T * L steps.
  per-layer  L independent pools of N = E items; the scan runs T steps and vmaps the pool step over L.
Configurations (capacity, policy hyper-parameters, seed) are vmapped outside the scan, so one compilation
serves a whole sweep of one policy.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from specmd_jax.policies.base import NEVER, EvictionPolicy, StepInfo

OUTCOME_NONE = 0
OUTCOME_HIT = 1
OUTCOME_COMPULSORY = 2
OUTCOME_CAPACITY = 3
OUTCOME_COLLISION = 4


class PoolState(NamedTuple):
    resident: jax.Array  # bool [N]
    seen: jax.Array  # bool [N], requested at least once
    evicted_pass: jax.Array  # int32 [N], pass of the most recent eviction, -1 never
    occupancy: jax.Array  # int32 scalar
    policy: Any


class StepCounts(NamedTuple):
    """Per-step tallies of one pool (summed by the caller)."""

    requests: jax.Array
    hits: jax.Array
    compulsory: jax.Array
    capacity: jax.Array
    collision: jax.Array
    evictions: jax.Array


class StepEvents(NamedTuple):
    outcomes: jax.Array  # int8 [R], OUTCOME_* of each request slot
    victims: jax.Array  # int32 [R], pool positions of the victims, ascending, -1 padded


def init_pool(policy: EvictionPolicy, num_items: int, params) -> PoolState:
    return PoolState(
        resident=jnp.zeros(num_items, bool),
        seen=jnp.zeros(num_items, bool),
        evicted_pass=jnp.full(num_items, -1, jnp.int32),
        occupancy=jnp.zeros((), jnp.int32),
        policy=policy.init(num_items, params),
    )


def pool_step(
    policy: EvictionPolicy,
    params,
    state: PoolState,
    request_positions: jax.Array,
    request_next_step: jax.Array,
    step: jax.Array,
    pass_index: jax.Array,
    capacity: jax.Array,
    rng: jax.Array,
    num_steps: int,
) -> tuple[PoolState, StepCounts, StepEvents]:
    """Advance one pool by one step.

    Args:
      request_positions: int32 [R], pool positions of the requested items in ascending order, -1 padded.
      request_next_step: int32 [R], the step of each requested item's next request (or NEVER).
      capacity: int32 scalar, the pool's slots (at least the step's request count; checked on the host).
    """
    num_items = state.resident.shape[0]
    max_requests = request_positions.shape[0]
    positions = jnp.arange(num_items, dtype=jnp.int32)

    # Requests as masks over the pool (padding -1 matches no position). Counts are taken over the R
    # request slots, not the N items: reductions along the item axis are slow on XLA:CPU.
    match = request_positions[:, None] == positions[None, :]
    scatter_to = jnp.where(request_positions >= 0, request_positions, num_items)
    requested = jnp.zeros(num_items, bool).at[scatter_to].set(True, mode="drop")
    next_use = jnp.max(jnp.where(match, request_next_step[:, None], -1), axis=0)
    next_use = jnp.where(requested, next_use, NEVER)
    hits = requested & state.resident
    misses = requested & ~state.resident
    slot = jnp.clip(request_positions, 0, num_items - 1)
    slot_used = request_positions >= 0
    slot_hit = slot_used & state.resident[slot]
    slot_miss = slot_used & ~slot_hit
    slot_compulsory = slot_miss & ~state.seen[slot]
    slot_collision = slot_miss & ~slot_compulsory & (state.evicted_pass[slot] == pass_index)
    info = StepInfo(
        step=step,
        pass_index=pass_index,
        requested=requested,
        hits=hits,
        misses=misses,
        next_use=next_use,
        capacity=capacity,
        occupancy=state.occupancy,
        request_positions=request_positions,
        request_hit=slot_hit,
        request_match=match,
        rng=rng,
        max_victims=max_requests,
        num_steps=num_steps,
    )

    # Hits first, then victims for the slots the misses need, then the insertions.
    policy_state = policy.on_hits(state.policy, params, info)
    num_misses = jnp.sum(slot_miss, dtype=jnp.int32)
    num_victims = jnp.maximum(state.occupancy + num_misses - capacity, 0)
    eligible = state.resident & ~requested
    victims, policy_state = policy.choose_victims(policy_state, params, info, eligible, num_victims)
    policy_state = policy.on_inserts(policy_state, params, info)
    new_state = PoolState(
        resident=(state.resident & ~victims) | misses,
        seen=state.seen | requested,
        evicted_pass=jnp.where(victims, pass_index, state.evicted_pass),
        occupancy=state.occupancy + num_misses - num_victims,
        policy=policy_state,
    )

    # A policy must return exactly num_victims victims; the reference simulator tests check it.
    num_compulsory = jnp.sum(slot_compulsory, dtype=jnp.int32)
    num_collision = jnp.sum(slot_collision, dtype=jnp.int32)
    counts = StepCounts(
        requests=jnp.sum(slot_used, dtype=jnp.int32),
        hits=jnp.sum(slot_hit, dtype=jnp.int32),
        compulsory=num_compulsory,
        capacity=num_misses - num_compulsory - num_collision,
        collision=num_collision,
        evictions=num_victims,
    )

    # Per-slot outcomes and victim positions (dropped by XLA unless events are recorded).
    outcome = jnp.where(
        slot_hit, OUTCOME_HIT,
        jnp.where(slot_compulsory, OUTCOME_COMPULSORY, jnp.where(slot_collision, OUTCOME_COLLISION, OUTCOME_CAPACITY)),
    )
    outcomes = jnp.where(slot_used, outcome, OUTCOME_NONE).astype(jnp.int8)
    (victim_positions,) = jnp.nonzero(victims, size=max_requests, fill_value=-1)
    return new_state, counts, StepEvents(outcomes, victim_positions.astype(jnp.int32))


class SweepTotals(NamedTuple):
    """Totals of one configuration (a leading config axis C when returned by `simulate_batch`)."""

    requests: jax.Array
    hits: jax.Array
    compulsory: jax.Array
    capacity: jax.Array
    collision: jax.Array
    evictions: jax.Array
    requests_per_layer: jax.Array  # int32 [L]
    hits_per_layer: jax.Array  # int32 [L]


def _totals_from(per_layer_counts: StepCounts) -> SweepTotals:
    """Sum StepCounts whose fields have a trailing layer axis [..., L]."""
    return SweepTotals(
        requests=per_layer_counts.requests.sum(-1),
        hits=per_layer_counts.hits.sum(-1),
        compulsory=per_layer_counts.compulsory.sum(-1),
        capacity=per_layer_counts.capacity.sum(-1),
        collision=per_layer_counts.collision.sum(-1),
        evictions=per_layer_counts.evictions.sum(-1),
        requests_per_layer=per_layer_counts.requests,
        hits_per_layer=per_layer_counts.hits,
    )


def _zero_counts(num_layers: int) -> StepCounts:
    return StepCounts(*(jnp.zeros(num_layers, jnp.int32) for _ in StepCounts._fields))


def _simulate_global(policy, params, capacity, seed, experts, next_step, num_experts, record_events, unroll):
    num_passes, num_layers, _ = experts.shape
    num_items = num_layers * num_experts
    flat_offset = (jnp.arange(num_layers, dtype=jnp.int32) * num_experts)[None, :, None]
    positions = jnp.where(experts >= 0, experts + flat_offset, -1).reshape(num_passes * num_layers, -1)
    next_steps = next_step.reshape(num_passes * num_layers, -1)
    steps = jnp.arange(num_passes * num_layers, dtype=jnp.int32)
    base_key = jax.random.PRNGKey(seed)

    def body(carry, xs):
        state, totals = carry
        request_positions, request_next, step = xs
        layer = step % num_layers
        pass_index = step // num_layers
        rng = jax.random.fold_in(base_key, step)
        state, counts, events = pool_step(
            policy, params, state, request_positions, request_next, step, pass_index, capacity, rng, num_passes * num_layers
        )
        totals = jax.tree.map(lambda total, value: total.at[layer].add(value), totals, counts)
        return (state, totals), (events if record_events else None)

    carry = (init_pool(policy, num_items, params), _zero_counts(num_layers))
    (_, totals), events = jax.lax.scan(body, carry, (positions, next_steps, steps), unroll=unroll)
    if record_events:
        events = StepEvents(
            outcomes=events.outcomes.reshape(num_passes, num_layers, -1),
            victims=events.victims.reshape(num_passes, num_layers, -1),
        )
    return _totals_from(totals), events


def _simulate_per_layer(policy, params, capacity, seed, experts, next_step, num_experts, record_events, unroll):
    num_passes, num_layers, _ = experts.shape
    layers = jnp.arange(num_layers, dtype=jnp.int32)
    base_key = jax.random.PRNGKey(seed)
    step_pool = jax.vmap(
        functools.partial(pool_step, num_steps=num_passes * num_layers), in_axes=(None, None, 0, 0, 0, 0, None, None, 0)
    )

    def body(carry, xs):
        states, totals = carry
        request_positions, request_next, pass_index = xs
        steps = pass_index * num_layers + layers
        rngs = jax.vmap(lambda s: jax.random.fold_in(base_key, s))(steps)
        states, counts, events = step_pool(policy, params, states, request_positions, request_next, steps, pass_index, capacity, rngs)
        totals = jax.tree.map(jnp.add, totals, counts)
        if record_events:
            flat_victims = jnp.where(events.victims >= 0, events.victims + layers[:, None] * num_experts, -1)
            events = StepEvents(events.outcomes, flat_victims)
        return (states, totals), (events if record_events else None)

    pools = jax.vmap(lambda _: init_pool(policy, num_experts, params))(layers)
    carry = (pools, _zero_counts(num_layers))
    passes = jnp.arange(num_passes, dtype=jnp.int32)
    (_, totals), events = jax.lax.scan(body, carry, (experts, next_step, passes), unroll=unroll)
    return _totals_from(totals), events


@functools.partial(jax.jit, static_argnames=("policy", "scope", "num_experts", "record_events", "unroll"))
def simulate_batch(
    policy: EvictionPolicy,
    params,
    capacities: jax.Array,
    seeds: jax.Array,
    experts: jax.Array,
    next_step: jax.Array,
    *,
    scope: str,
    num_experts: int,
    record_events: bool = False,
    unroll: int = 1,
) -> tuple[SweepTotals, StepEvents | None]:
    """Simulate C configurations of one policy in one compiled call.

    Args:
      params: the policy's params pytree with a leading config axis C on every leaf.
      capacities: int32 [C], slots per pool (for `per-layer` scope: per layer).
      seeds: int32 [C], seeds of the per-step random keys.
      experts, next_step: int32 [T, L, R] from `build_requests`.
    Returns:
      SweepTotals with a leading axis C; when `record_events`, StepEvents with leaves [C, T, L, R]
      (victims as flat ids layer * E + expert), else None.
    """
    simulate_one = {"global": _simulate_global, "per-layer": _simulate_per_layer}[scope]

    def run(config_params, capacity, seed):
        return simulate_one(policy, config_params, capacity, seed, experts, next_step, num_experts, record_events, unroll)

    return jax.vmap(run)(params, capacities, seeds)

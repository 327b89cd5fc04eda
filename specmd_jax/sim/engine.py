"""The simulator's one scan loop: a cache pool stepped through the requests of a trace.

The step semantics are written down in docs/semantics.md. A scan step handles all requests of one
(pass, layer) at once, because on XLA:CPU each scan step costs about a microsecond whatever it does.

Scopes:
  global     one pool of N = L * E items; the scan runs T * L steps.
  per-layer  L independent pools of N = E items; the scan runs T steps and vmaps the pool step over L.
Configurations (capacity, policy hyper-parameters, seed) are vmapped outside the scan, so one compilation
serves a whole sweep of one policy.

`pool_step` is a step's demand phase and `prefetch_step` its prefetch phase; the scan with prefetching
and miss-handling modes is in `specmd_jax.sim.prefetch`. The runtime cache manager calls the same two
functions.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from specmd_jax.policies.base import INT_MAX, NEVER, EvictionPolicy, StepInfo

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


def _apply_requests(
    policy: EvictionPolicy,
    params,
    state: PoolState,
    info: StepInfo,
    eligible: jax.Array,
    num_inserts: jax.Array,
    call_on_hits: bool,
) -> tuple[Any, jax.Array, jax.Array]:
    """Run one phase of the policy: hits, then victims for the slots the insertions need, then insertions.

    Returns the policy state, the victims (bool [N]) and their number.
    """
    policy_state = state.policy
    if call_on_hits:
        policy_state = policy.on_hits(policy_state, params, info)
    num_victims = jnp.maximum(state.occupancy + num_inserts - info.capacity, 0)
    victims, policy_state = policy.choose_victims(policy_state, params, info, eligible, num_victims)
    policy_state = policy.on_inserts(policy_state, params, info)
    return policy_state, victims, num_victims


def _requests_only_hits(request_positions: jax.Array, request_next_step: jax.Array, slot_hit: jax.Array):
    """Keep the hit slots of a request list, moved to the front in ascending position, -1 padded."""
    key = jnp.where(slot_hit, request_positions, INT_MAX)
    order = jnp.argsort(key, stable=True)
    kept = jnp.take(slot_hit, order)
    return jnp.where(kept, jnp.take(request_positions, order), -1), jnp.where(kept, jnp.take(request_next_step, order), -1)


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
    *,
    insert_misses: bool = True,
    used_positions: jax.Array | None = None,
    used_next_step: jax.Array | None = None,
) -> tuple[PoolState, StepCounts, StepEvents]:
    """Advance one pool by the demand phase of one step.

    Args:
      request_positions: int32 [R], pool positions of the requested items in ascending order, -1 padded.
      request_next_step: int32 [R], the step of each requested item's next request (or NEVER).
      capacity: int32 scalar, the pool's slots (at least the step's request count; checked on the host).
      insert_misses: False computes every miss elsewhere (on the host): misses are counted but never
        inserted, so nothing is evicted and the policy receives only the hits.
      used_positions, used_next_step: int32 [R], the items the step really uses when they differ from
        its requests (misses replaced by resident substitutes), ascending and -1 padded. The requests
        still decide the outcomes and which items count as seen; the policy receives the used items, and
        the used items that are not resident are inserted.
    """
    num_items = state.resident.shape[0]
    max_requests = request_positions.shape[0]
    slot = jnp.clip(request_positions, 0, num_items - 1)
    slot_used = request_positions >= 0
    slot_hit = slot_used & state.resident[slot]
    slot_miss = slot_used & ~slot_hit
    slot_compulsory = slot_miss & ~state.seen[slot]
    slot_collision = slot_miss & ~slot_compulsory & (state.evicted_pass[slot] == pass_index)
    num_misses = jnp.sum(slot_miss, dtype=jnp.int32)

    all_requested = _positions_mask(request_positions, num_items)
    if used_positions is not None:
        used_slot = jnp.clip(used_positions, 0, num_items - 1)
        num_inserts = jnp.sum((used_positions >= 0) & ~state.resident[used_slot], dtype=jnp.int32)
        request_positions, request_next_step = used_positions, used_next_step
    elif insert_misses:
        num_inserts = num_misses
    else:
        num_inserts = jnp.zeros((), jnp.int32)
        request_positions, request_next_step = _requests_only_hits(request_positions, request_next_step, slot_hit)
    info = _step_info(state, request_positions, request_next_step, step, pass_index, capacity, rng, num_steps)
    policy_state, victims, num_victims = _apply_requests(
        policy, params, state, info, state.resident & ~info.requested, num_inserts, call_on_hits=True
    )
    new_state = PoolState(
        resident=(state.resident & ~victims) | info.misses,
        seen=state.seen | all_requested,
        evicted_pass=jnp.where(victims, pass_index, state.evicted_pass),
        occupancy=state.occupancy + num_inserts - num_victims,
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


def _positions_mask(positions: jax.Array, num_items: int) -> jax.Array:
    """Return bool [N], True at the given pool positions (-1 entries mark nothing)."""
    scatter_to = jnp.where(positions >= 0, positions, num_items)
    return jnp.zeros(num_items, bool).at[scatter_to].set(True, mode="drop")


def _step_info(state: PoolState, positions, next_steps, step, pass_index, capacity, rng, num_steps, phase=0) -> StepInfo:
    """Describe one phase whose touched items are `positions` (ascending, -1 padded) to the policy."""
    num_items = state.resident.shape[0]
    item_positions = jnp.arange(num_items, dtype=jnp.int32)
    # Counts are taken over the R request slots, not the N items: reductions along the item axis are
    # slow on XLA:CPU.
    match = positions[:, None] == item_positions[None, :]
    requested = _positions_mask(positions, num_items)
    next_use = jnp.max(jnp.where(match, next_steps[:, None], -1), axis=0)
    slot = jnp.clip(positions, 0, num_items - 1)
    return StepInfo(
        step=step,
        pass_index=pass_index,
        requested=requested,
        hits=requested & state.resident,
        misses=requested & ~state.resident,
        next_use=jnp.where(requested, next_use, NEVER),
        resident=state.resident,
        capacity=capacity,
        occupancy=state.occupancy,
        request_positions=positions,
        request_hit=(positions >= 0) & state.resident[slot],
        request_match=match,
        rng=rng,
        max_victims=positions.shape[0],
        num_steps=num_steps,
        phase=phase,
    )


class PrefetchTracking(NamedTuple):
    """Prefetched items that no request has used yet, per pool item."""

    target: jax.Array  # int32 [N], step the prefetch was issued for, -1 when the item is not a pending prefetch
    issued: jax.Array  # int32 [N], step that issued it, -1 likewise


def init_tracking(num_items: int) -> PrefetchTracking:
    return PrefetchTracking(jnp.full(num_items, -1, jnp.int32), jnp.full(num_items, -1, jnp.int32))


class PrefetchOutcome(NamedTuple):
    """Result of the prefetch phase of one step."""

    admitted: jax.Array  # int32 [B], pool positions of the prefetched items in priority order, -1 padded
    victims: jax.Array  # bool [N]
    num_prefetches: jax.Array  # int32 scalar
    num_victims: jax.Array  # int32 scalar
    wasted: jax.Array  # int32 scalar, victims that were prefetched and never used


def prefetch_step(
    policy: EvictionPolicy,
    params,
    state: PoolState,
    tracking: PrefetchTracking,
    candidates: jax.Array,
    candidate_target: jax.Array,
    candidate_next_use: jax.Array,
    protected: jax.Array,
    step: jax.Array,
    pass_index: jax.Array,
    capacity: jax.Array,
    budget: jax.Array,
    rng: jax.Array,
    num_steps: int,
) -> tuple[PoolState, PrefetchTracking, PrefetchOutcome]:
    """Run the prefetch phase of a step, after its demand phase (see docs/semantics.md).

    Args:
      candidates: int32 [B], pool positions proposed for prefetching in priority order, -1 padded;
        resident candidates are skipped.
      candidate_target: int32 [B], the step each candidate is prefetched for (later than `step`).
      candidate_next_use: int32 [B], each candidate's next request step after `step`, or NEVER.
      protected: bool [N], items this phase must not evict: the step's requests and the resident items
        the prefetcher selected. Pending prefetches whose target step has not run yet are added here.
      budget: int32 scalar, the most prefetches this step issues.
    Returns the new pool state and tracking, and what was prefetched and evicted. The first `budget`
    non-resident candidates are prefetched. When the free slots and the evictable items are fewer,
    only that many are prefetched, again the first in priority order.
    """
    num_items = state.resident.shape[0]
    slot = jnp.clip(candidates, 0, num_items - 1)
    open_ = (candidates >= 0) & ~state.resident[slot]
    order = jnp.cumsum(open_.astype(jnp.int32)) - 1

    # A pending prefetch whose target step has not run yet is protected, like this step's requests.
    protected = protected | (tracking.target > step)
    eligible = state.resident & ~protected
    room = capacity - state.occupancy + jnp.sum(eligible, dtype=jnp.int32)
    limit = jnp.minimum(budget, room)
    admitted = open_ & (order < limit)
    num_prefetches = jnp.sum(admitted, dtype=jnp.int32)

    # The policy receives the admitted items in ascending position, like a step's misses.
    sort_key = jnp.where(admitted, candidates, INT_MAX)
    by_position = jnp.argsort(sort_key, stable=True)
    kept = jnp.take(admitted, by_position)
    positions = jnp.where(kept, jnp.take(candidates, by_position), -1)
    next_steps = jnp.where(kept, jnp.take(candidate_next_use, by_position), -1)
    info = _step_info(state, positions, next_steps, step, pass_index, capacity, rng, num_steps, phase=1)
    policy_state, victims, num_victims = _apply_requests(
        policy, params, state, info, eligible, num_prefetches, call_on_hits=False
    )
    new_state = PoolState(
        resident=(state.resident & ~victims) | info.misses,
        seen=state.seen,
        evicted_pass=jnp.where(victims, pass_index, state.evicted_pass),
        occupancy=state.occupancy + num_prefetches - num_victims,
        policy=policy_state,
    )

    wasted = jnp.sum(victims & (tracking.target >= 0), dtype=jnp.int32)
    targets = jnp.where(admitted, candidates, num_items)
    target = jnp.where(victims, -1, tracking.target).at[targets].set(candidate_target, mode="drop")
    issued = jnp.where(victims, -1, tracking.issued).at[targets].set(step, mode="drop")
    outcome = PrefetchOutcome(
        admitted=jnp.where(admitted, candidates, -1),
        victims=victims,
        num_prefetches=num_prefetches,
        num_victims=num_victims,
        wasted=wasted,
    )
    return new_state, PrefetchTracking(target, issued), outcome


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


def per_layer_pool_totals(experts: jax.Array, capacities: jax.Array, hits: jax.Array, seen: jax.Array) -> SweepTotals:
    """Build the totals of per-layer pools that have no collision misses, for every capacity [C].

    Args:
      experts: int32 [T, L, R], `StepRequests.experts`.
      hits: int32 [C, L], hits per capacity and layer.
      seen: int32 [L], distinct experts each layer requested: its compulsory misses, and its final
        occupancy where the capacity allows.
    Every miss is inserted, so evictions are the misses minus the final occupancy min(C, seen).
    """
    num_capacities, num_layers = hits.shape
    requests_per_layer = jnp.sum(experts >= 0, axis=(0, 2), dtype=jnp.int32)
    misses = requests_per_layer[None, :] - hits
    occupancy = jnp.minimum(capacities[:, None], seen[None, :])
    return SweepTotals(
        requests=jnp.broadcast_to(requests_per_layer.sum(), (num_capacities,)),
        hits=hits.sum(-1),
        compulsory=jnp.broadcast_to(seen.sum(), (num_capacities,)),
        capacity=(misses - seen[None, :]).sum(-1),
        collision=jnp.zeros(num_capacities, jnp.int32),
        evictions=(misses - occupancy).sum(-1),
        requests_per_layer=jnp.broadcast_to(requests_per_layer, (num_capacities, num_layers)),
        hits_per_layer=hits,
    )


def _zero_counts(num_layers: int) -> StepCounts:
    return StepCounts(*(jnp.zeros(num_layers, jnp.int32) for _ in StepCounts._fields))


def _simulate_global(policy, params, capacity, seed, experts, next_step, num_experts, record_events, unroll):
    num_passes, num_layers, _ = experts.shape
    num_items = num_layers * num_experts
    flat_offset = (jnp.arange(num_layers, dtype=jnp.int32) * num_experts)[None, :, None]
    # An explicit slot count, because -1 cannot be inferred for zero passes.
    positions = jnp.where(experts >= 0, experts + flat_offset, -1).reshape(num_passes * num_layers, experts.shape[2])
    next_steps = next_step.reshape(num_passes * num_layers, experts.shape[2])
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

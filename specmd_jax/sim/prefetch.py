"""The simulator's scan with a prefetch phase and a miss-handling mode (global scope).

Each step runs the demand phase of `engine.pool_step`, then chooses prefetch candidates from a score
table row and runs `engine.prefetch_step`. The rules are written down in docs/semantics.md.

A score table is float32 [T * L, D, E]: row s scores, for each lookahead j = 1 .. D, every expert of the
target step s + j (its layer is (s + j) mod L; lookahead wraps into the next pass). The builders are in
`specmd_jax.prefetch.sources`. A selection rule turns a row into candidates:
  all     every expert with a positive score (oracle, previous-pass);
  top-k   the `top_k` highest-scoring experts of each target step;
  mass    the fewest highest-scoring experts of each target step whose share of the row's score
          reaches `threshold`.
Candidates are ordered by lookahead, then score (highest first), then expert id, and the non-resident
ones are prefetched up to the per-step `budget`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from specmd_jax.policies.base import INT_MAX, NEVER, EvictionPolicy
from specmd_jax.sim.engine import (
    SweepTotals,
    _totals_from,
    _zero_counts,
    init_pool,
    init_tracking,
    pool_step,
    prefetch_step,
)

SELECTIONS = ("all", "top-k", "mass")
MISS_MODES = ("demand", "host", "substitute")


class PrefetchParams(NamedTuple):
    """Swept prefetch hyper-parameters (vmappable)."""

    top_k: jax.Array  # int32, experts per target step for `top-k`
    threshold: jax.Array  # float32 in (0, 1], score share per target step for `mass`
    budget: jax.Array  # int32 >= 0, prefetches per step


class PrefetchCounts(NamedTuple):
    """Per-step prefetch tallies (summed per layer by the scan)."""

    prefetches: jax.Array
    prefetch_hits: jax.Array
    wasted: jax.Array
    substitutions: jax.Array


class PrefetchTotals(NamedTuple):
    """Totals of one configuration (a leading config axis C from `simulate_prefetch_batch`)."""

    prefetches: jax.Array
    prefetch_hits: jax.Array
    wasted: jax.Array
    substitutions: jax.Array  # misses served by a resident substitute (miss mode `substitute`)
    prefetches_per_layer: jax.Array  # int32 [L], by issuing layer
    prefetch_hits_per_layer: jax.Array  # int32 [L], by requesting layer


class PrefetchEvents(NamedTuple):
    """Per-step record of one configuration; leaves [T, L, ...] after reshaping."""

    outcomes: jax.Array  # int8 [R], OUTCOME_* of each request slot
    victims: jax.Array  # int32 [R], flat ids of the demand phase's victims, ascending, -1 padded
    prefetched: jax.Array  # int32 [B], flat ids prefetched, in issue (priority) order, -1 padded
    prefetch_victims: jax.Array  # int32 [B], flat ids the prefetch phase evicted, ascending, -1 padded
    prefetch_source: jax.Array  # int32 [R], for a hit on a pending prefetch the step that issued it, else -1
    substitute: jax.Array  # int32 [R], for a miss served by a substitute its flat id, else -1


def select_candidates(
    scores: jax.Array,
    resident: jax.Array,
    step: jax.Array,
    params: PrefetchParams,
    *,
    selection: str,
    num_layers: int,
    num_steps: int,
    max_budget: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Turn one score table row into prefetch candidates.

    Args:
      scores: float32 [D, E], the row of `step`.
      resident: bool [L * E], the cache after the step's demand phase.
    Returns int32 [max_budget] flat ids of non-resident candidates in priority order (-1 padded),
    int32 [max_budget] the target step of each, and bool [L * E] the selected experts that are already
    resident (the prefetch phase must not evict them).
    """
    depth, num_experts = scores.shape
    lookahead = jnp.arange(1, depth + 1, dtype=jnp.int32)
    target = step + lookahead
    flat = (target % num_layers)[:, None] * num_experts + jnp.arange(num_experts, dtype=jnp.int32)[None, :]
    valid = (target < num_steps)[:, None] & (scores > 0)

    # Rank of each expert within its target step: highest score first, then lowest id.
    order = jnp.argsort(-scores, axis=1, stable=True)
    rank = jnp.argsort(order, axis=1).astype(jnp.int32)
    if selection == "all":
        chosen = valid
    elif selection == "top-k":
        chosen = valid & (rank < params.top_k)
    elif selection == "mass":
        # The fewest experts whose score share reaches the threshold: keep an expert while the share
        # of the experts ranked before it is still below the threshold.
        positive = jnp.where(valid, scores, 0.0)
        total = jnp.sum(positive, axis=1, keepdims=True)
        ranked = jnp.take_along_axis(positive, order, axis=1)
        before_ranked = jnp.cumsum(ranked, axis=1) - ranked
        before = jnp.take_along_axis(before_ranked, rank, axis=1)
        chosen = valid & (before < params.threshold * total)
    else:
        raise ValueError(f"unknown prefetch selection '{selection}'; expected one of {SELECTIONS}")
    chosen_resident = chosen & resident[flat]
    chosen = chosen & ~resident[flat]
    keep_resident = jnp.zeros_like(resident).at[jnp.where(chosen_resident, flat, resident.shape[0])].set(True, mode="drop")

    priority = (lookahead[:, None] - 1) * num_experts + rank
    priority = jnp.where(chosen, priority, INT_MAX).reshape(-1)
    count = min(max_budget, depth * num_experts)
    negated, index = jax.lax.top_k(-priority, count)
    keep = (-negated < INT_MAX) & (jnp.arange(count) < params.budget)
    candidates = jnp.where(keep, flat.reshape(-1)[index], -1)
    candidate_target = jnp.where(keep, target[index // num_experts], -1)
    if count < max_budget:
        pad = max_budget - count
        candidates = jnp.concatenate([candidates, jnp.full(pad, -1, jnp.int32)])
        candidate_target = jnp.concatenate([candidate_target, jnp.full(pad, -1, jnp.int32)])
    return candidates.astype(jnp.int32), candidate_target.astype(jnp.int32), keep_resident


def next_request_table(presence: np.ndarray) -> np.ndarray:
    """Return int32 [T * L * E]: at index s * E + e, the first step >= s whose layer is s mod L and that requests e, or NEVER."""
    T, L, E = presence.shape
    request_pass = np.where(presence, np.arange(T, dtype=np.int64)[:, None, None], np.iinfo(np.int64).max)
    first_from = np.minimum.accumulate(request_pass[::-1], axis=0)[::-1]
    steps = first_from * L + np.arange(L, dtype=np.int64)[None, :, None]
    table = np.where(first_from == np.iinfo(np.int64).max, NEVER, steps)
    if (table[table != NEVER] >= NEVER).any():
        raise ValueError(f"trace has {T} passes x {L} layers: too many steps for int32 step indices")
    return table.astype(np.int32).reshape(-1)


def choose_substitutes(
    request_positions: jax.Array,
    resident: jax.Array,
    router_scores: jax.Array,
    layer: jax.Array,
    num_candidates: int,
) -> jax.Array:
    """Pick a resident substitute for each missed request slot, as far as there are any.

    The candidates are the `num_candidates` experts of the layer that the router scores highest (ties to
    the smaller id). The qualified ones are resident and not requested in this step. The misses, in
    ascending expert id, take them in score order.
    Returns int32 [R]: for each slot the substitute's flat id, or -1 (no miss, or no qualified candidate left).
    """
    num_experts = router_scores.shape[0]
    num_items = resident.shape[0]
    slot = jnp.clip(request_positions, 0, num_items - 1)
    slot_miss = (request_positions >= 0) & ~resident[slot]

    layer_items = layer * num_experts + jnp.arange(num_experts, dtype=jnp.int32)
    requested_experts = jnp.zeros(num_experts, bool).at[
        jnp.where(request_positions >= 0, request_positions - layer * num_experts, num_experts)
    ].set(True, mode="drop")
    order = jnp.argsort(-router_scores, stable=True)
    rank = jnp.argsort(order).astype(jnp.int32)
    qualified = (rank < num_candidates) & resident[layer_items] & ~requested_experts
    by_score = jnp.argsort(jnp.where(qualified, rank, INT_MAX), stable=True)
    num_qualified = jnp.sum(qualified, dtype=jnp.int32)

    miss_index = jnp.cumsum(slot_miss.astype(jnp.int32)) - 1
    served = slot_miss & (miss_index < num_qualified)
    chosen = jnp.take(by_score, jnp.clip(miss_index, 0, num_experts - 1))
    return jnp.where(served, layer * num_experts + chosen, -1).astype(jnp.int32)


def _used_requests(request_positions, request_next, substitute, step, next_use_table, num_experts):
    """Return the items a step uses when substitutes replace some misses: ascending, -1 padded, with next requests."""
    replaced = substitute >= 0
    kept = (request_positions >= 0) & ~replaced
    substitute_next = next_use_table[jnp.clip(step * num_experts + substitute % num_experts, 0, next_use_table.shape[0] - 1)]
    values = jnp.concatenate([jnp.where(kept, request_positions, -1), substitute])
    next_values = jnp.concatenate([jnp.where(kept, request_next, -1), jnp.where(replaced, substitute_next, -1)])
    order = jnp.argsort(jnp.where(values >= 0, values, INT_MAX), stable=True)[: request_positions.shape[0]]
    return jnp.take(values, order), jnp.take(next_values, order)


def _simulate_one(
    policy, params, prefetch_params, capacity, seed, experts, next_step, scores, next_use_table, router_scores,
    num_experts, selection, max_budget, miss_mode, substitute_candidates, record_events, unroll,
):
    num_passes, num_layers, _ = experts.shape
    num_steps = num_passes * num_layers
    num_items = num_layers * num_experts
    flat_offset = (jnp.arange(num_layers, dtype=jnp.int32) * num_experts)[None, :, None]
    positions = jnp.where(experts >= 0, experts + flat_offset, -1).reshape(num_steps, -1)
    next_steps = next_step.reshape(num_steps, -1)
    steps = jnp.arange(num_steps, dtype=jnp.int32)
    base_key = jax.random.PRNGKey(seed)

    def body(carry, xs):
        state, tracking, totals, prefetch_totals = carry
        request_positions, request_next, step, score_row, router_row = xs
        layer = step % num_layers
        pass_index = step // num_layers
        rng = jax.random.fold_in(base_key, step)

        # Demand phase; a hit on a pending prefetch is a prefetch hit.
        slot = jnp.clip(request_positions, 0, num_items - 1)
        slot_pending = (request_positions >= 0) & state.resident[slot] & (tracking.target[slot] >= 0)
        prefetch_source = jnp.where(slot_pending, tracking.issued[slot], -1)
        was_pending = tracking.target >= 0
        state_before = state
        substitute = jnp.full_like(request_positions, -1)
        used_positions = used_next = None
        if miss_mode == "substitute":
            substitute = choose_substitutes(request_positions, state.resident, router_row, layer, substitute_candidates)
            used_positions, used_next = _used_requests(
                request_positions, request_next, substitute, step, next_use_table, num_experts
            )
        state, counts, events = pool_step(
            policy, params, state, request_positions, request_next, step, pass_index, capacity, rng, num_steps,
            insert_misses=miss_mode != "host", used_positions=used_positions, used_next_step=used_next,
        )
        demand_victims = state_before.resident & ~state.resident
        requested = jnp.zeros(num_items, bool).at[jnp.where(request_positions >= 0, request_positions, num_items)].set(
            True, mode="drop"
        )
        # Substitutes compute in this step, so the prefetch phase must not evict them either.
        in_use = requested.at[jnp.where(substitute >= 0, substitute, num_items)].set(True, mode="drop")
        wasted = jnp.sum(demand_victims & was_pending, dtype=jnp.int32)
        cleared = requested | demand_victims
        tracking = tracking._replace(
            target=jnp.where(cleared, -1, tracking.target), issued=jnp.where(cleared, -1, tracking.issued)
        )

        # Prefetch phase, with its own random draws.
        candidates, candidate_target, keep_resident = select_candidates(
            score_row, state.resident, step, prefetch_params,
            selection=selection, num_layers=num_layers, num_steps=num_steps, max_budget=max_budget,
        )
        lookup = jnp.clip(candidate_target, 0, num_steps - 1) * num_experts + candidates % num_experts
        candidate_next_use = jnp.where(candidates >= 0, next_use_table[lookup], NEVER)
        state, tracking, outcome = prefetch_step(
            policy, params, state, tracking, candidates, candidate_target, candidate_next_use, in_use | keep_resident,
            step, pass_index, capacity, prefetch_params.budget, jax.random.fold_in(rng, 1), num_steps,
        )

        totals = jax.tree.map(lambda total, value: total.at[layer].add(value), totals, counts)
        step_prefetch = PrefetchCounts(
            prefetches=outcome.num_prefetches,
            prefetch_hits=jnp.sum(slot_pending, dtype=jnp.int32),
            wasted=wasted + outcome.wasted,
            substitutions=jnp.sum(substitute >= 0, dtype=jnp.int32),
        )
        prefetch_totals = jax.tree.map(lambda total, value: total.at[layer].add(value), prefetch_totals, step_prefetch)
        totals = totals._replace(evictions=totals.evictions.at[layer].add(outcome.num_victims))
        record = None
        if record_events:
            (prefetch_victims,) = jnp.nonzero(outcome.victims, size=max_budget, fill_value=-1)
            record = PrefetchEvents(
                outcomes=events.outcomes,
                victims=events.victims,
                prefetched=_compact(outcome.admitted),
                prefetch_victims=prefetch_victims.astype(jnp.int32),
                prefetch_source=prefetch_source,
                substitute=substitute,
            )
        return (state, tracking, totals, prefetch_totals), record

    zero = PrefetchCounts(*(jnp.zeros(num_layers, jnp.int32) for _ in PrefetchCounts._fields))
    carry = (init_pool(policy, num_items, params), init_tracking(num_items), _zero_counts(num_layers), zero)
    (_, _, totals, prefetch_totals), events = jax.lax.scan(
        body, carry, (positions, next_steps, steps, scores, router_scores), unroll=unroll
    )
    if record_events:
        events = jax.tree.map(lambda leaf: leaf.reshape(num_passes, num_layers, -1), events)
    summary = PrefetchTotals(
        prefetches=prefetch_totals.prefetches.sum(-1),
        prefetch_hits=prefetch_totals.prefetch_hits.sum(-1),
        wasted=prefetch_totals.wasted.sum(-1),
        substitutions=prefetch_totals.substitutions.sum(-1),
        prefetches_per_layer=prefetch_totals.prefetches,
        prefetch_hits_per_layer=prefetch_totals.prefetch_hits,
    )
    return _totals_from(totals), summary, events


def _compact(candidates: jax.Array) -> jax.Array:
    """Move the non-negative entries of `candidates` to the front, keeping their order; -1 padded."""
    order = jnp.argsort(candidates < 0, stable=True)
    return jnp.take(candidates, order)


@functools.partial(
    jax.jit,
    static_argnames=(
        "policy", "num_experts", "selection", "max_budget", "miss_mode", "substitute_candidates", "record_events", "unroll",
    ),
)
def simulate_prefetch_batch(
    policy: EvictionPolicy,
    params,
    prefetch_params: PrefetchParams,
    capacities: jax.Array,
    seeds: jax.Array,
    experts: jax.Array,
    next_step: jax.Array,
    scores: jax.Array,
    next_use_table: jax.Array,
    router_scores: jax.Array | None = None,
    *,
    num_experts: int,
    selection: str,
    max_budget: int,
    miss_mode: str = "demand",
    substitute_candidates: int = 0,
    record_events: bool = False,
    unroll: int = 1,
) -> tuple[SweepTotals, PrefetchTotals, PrefetchEvents | None]:
    """Simulate C configurations of one eviction policy and one score table in one compiled call.

    Args:
      params, prefetch_params: pytrees with a leading config axis C on every leaf.
      capacities, seeds: int32 [C].
      experts, next_step: int32 [T, L, R] from `build_requests`.
      scores: float32 [T * L, D, E], the score table.
      next_use_table: int32 [T * L * E] from `next_request_table`.
      router_scores: float32 [T * L, E], the router's mean probability of each expert per step. Miss
        mode `substitute` needs it because it draws substitutes from the `substitute_candidates` best.
      max_budget: static bound on every config's budget (the candidate list length B).
    """
    if miss_mode not in MISS_MODES:
        raise ValueError(f"unknown miss mode '{miss_mode}'; expected one of {MISS_MODES}")
    if router_scores is None:
        if miss_mode == "substitute":
            raise ValueError("miss mode 'substitute' needs router_scores")
        router_scores = jnp.zeros((scores.shape[0], 0), jnp.float32)

    def run(config_params, config_prefetch, capacity, seed):
        return _simulate_one(
            policy, config_params, config_prefetch, capacity, seed, experts, next_step, scores, next_use_table,
            router_scores, num_experts, selection, max_budget, miss_mode, substitute_candidates, record_events, unroll,
        )

    return jax.vmap(run)(params, prefetch_params, capacities, seeds)


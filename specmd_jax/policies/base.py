"""The eviction-policy interface shared by the simulator and the runtime.

The framework (`specmd_jax.sim.engine`) owns residency, capacity and the step order; a policy only keeps
its own ranking state and names victims. Every function is pure and jit-compatible, and every swept value
(capacity, hyper-parameters, seed) is data in a pytree, so one compilation serves a whole sweep.

Shapes: N is the number of items in one cache pool (L * E for `global` scope, E for `per-layer` scope).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

INT_MAX = jnp.iinfo(jnp.int32).max
NEVER = INT_MAX
"""Step value meaning "never requested again" (Belady) or "never happened"."""


class StepInfo(NamedTuple):
    """The framework's description of the current step of one cache pool, passed to every policy function.

    All masks are bool [N] over the pool's items, indexed by position in the pool. A smaller position
    always has a smaller flat id, so "smallest position" and "smallest flat id" agree.

    A step has a demand phase and, with a prefetcher, a prefetch phase (docs/semantics.md). In the
    prefetch phase the prefetched items play the part of the misses: `requested` and `misses` are the
    prefetched items, `hits` and `request_hit` are empty, and the request slots list the prefetched items.
    """

    step: jax.Array  # int32 scalar, global step index s = p * L + l
    pass_index: jax.Array  # int32 scalar
    requested: jax.Array  # bool [N], the items this phase touches: the requests, or the prefetched items
    hits: jax.Array  # bool [N]
    misses: jax.Array  # bool [N], the items this phase inserts
    next_use: jax.Array  # int32 [N], next request step of each requested item after this one, else NEVER
    resident: jax.Array  # bool [N], items in the cache before this phase's victims leave
    capacity: jax.Array  # int32 scalar, slots of this pool
    occupancy: jax.Array  # int32 scalar, resident items before this step
    request_positions: jax.Array  # int32 [R], pool positions of the requests, ascending, -1 padded
    request_hit: jax.Array  # bool [R], whether each request slot is a hit
    request_match: jax.Array  # bool [R, N], request_match[j, i] = slot j requests item i
    rng: jax.Array  # PRNG key for this step (already folded with the step index)
    max_victims: int  # static bound on the victims of one step: the number of request slots R
    num_steps: int  # static number of steps of the trace (T * L); every step index is below it
    phase: int = 0  # static: 0 demand phase, where the resident items that are not eligible are exactly
    # the hits; 1 prefetch phase, where they are the protected items (see `EvictionPolicy`)


class EvictionPolicy(NamedTuple):
    """A named set of pure functions; `params` is a pytree of hyper-parameters (may be `()`).

    init(num_items, params) -> state
    on_hits(state, params, info) -> state             # step 2: hits, ascending expert id
    choose_victims(state, params, info, eligible, num_victims) -> (victims bool [N], state)
    on_inserts(state, params, info) -> state          # step 4: misses, ascending expert id
    """

    name: str
    init: Callable[[int, Any], Any]
    on_hits: Callable[[Any, Any, StepInfo], Any]
    choose_victims: Callable[[Any, Any, StepInfo, jax.Array, jax.Array], tuple[jax.Array, Any]]
    on_inserts: Callable[[Any, Any, StepInfo], Any]
    default_params: Callable[[], Any] = lambda: ()
    description: str = ""
    check_params: Callable[[Any], None] | None = None  # host-side validation, raises ValueError


def rank_in_mask(mask: jax.Array) -> jax.Array:
    """Return, for each True entry, how many True entries precede it (0-based rank in index order)."""
    return jnp.cumsum(mask.astype(jnp.int32)) - 1


def assign_sequence(seq: jax.Array, counter: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Give the masked items consecutive sequence numbers from `counter`, in ascending position."""
    new_seq = jnp.where(mask, counter + rank_in_mask(mask), seq)
    return new_seq, counter + jnp.sum(mask, dtype=jnp.int32)


SORT_ABOVE_VICTIMS = 8
"""`select_smallest` sorts once instead of searching round by round when a step may need more victims
than this (prefetch phases with large budgets)."""


def select_smallest(
    eligible: jax.Array,
    num_victims: jax.Array,
    max_victims: int,
    primary: jax.Array,
    secondary: jax.Array | None = None,
    *,
    unique: bool = False,
) -> jax.Array:
    """Pick the `num_victims` eligible items with the smallest key, as a bool mask.

    The key is `primary`, then `secondary` for ties, then the item position. Pass `unique=True` only when
    the primary keys of eligible items are distinct (sequence numbers): it skips the tie-break and is
    faster. `max_victims` is a static bound on `num_victims` (the number of request slots of a step).
    """
    positions = jnp.arange(eligible.shape[0], dtype=jnp.int32)
    if max_victims > SORT_ABOVE_VICTIMS:
        # One sort by (not eligible, key, secondary, position) picks the same items as the rounds below.
        keys = (positions,) if secondary is None else (positions, secondary)
        order = jnp.lexsort(keys + (primary, (~eligible).astype(jnp.int32)))
        rank = jnp.zeros_like(positions).at[order].set(positions)
        return eligible & (rank < num_victims)
    chosen = jnp.zeros_like(eligible)
    for round_index in range(max_victims):
        open_ = eligible & ~chosen & (round_index < num_victims)
        key = jnp.where(open_, primary, INT_MAX)
        candidates = open_ & (key == jnp.min(key))
        if secondary is None and unique:
            # Distinct keys: the minimum is one item, so no tie-break pass is needed.
            chosen = chosen | candidates
            continue
        if secondary is not None:
            second = jnp.where(candidates, secondary, INT_MAX)
            candidates = candidates & (second == jnp.min(second))
        first = jnp.min(jnp.where(candidates, positions, INT_MAX))
        chosen = chosen | (candidates & (positions == first))
    return chosen

"""S3-FIFO eviction, from Yang et al., "FIFO queues are all you need for cache eviction", SOSP 2023.

Rule (docs/semantics.md): three FIFO queues, small S, main M and ghost G; ghost entries hold no slot. A
hit raises the item's frequency by one, capped at 3. A miss whose item is in G is inserted into M and
leaves G; every other miss is inserted into S, and inserted items start at frequency 0. Freeing one slot
repeats these moves until a victim is found:
  - Take from S when S contains at least small_fraction x capacity items, or when M has no item that is
    not requested in this step. The oldest item of S not requested in this step either moves to the
    newest end of M with frequency 0 (frequency >= promote_threshold) or is the victim and its id enters G.
  - Otherwise take the oldest item of M not requested in this step. It either moves to the newest end
    of M with its frequency lowered by one (frequency > 0) or is the victim.
G keeps at most capacity - round(small_fraction x capacity) ids and drops its oldest entry first.

Choices this module makes where the rule leaves room (the reference simulator must make the same ones):
  - The S count includes the S items requested in this step.
  - small_fraction x capacity is computed exactly, with small_fraction rounded to the nearest
    millionth (see `small_share`); float32 would make 0.15 x 100 slightly more than 15. S is large
    enough at ceil(small_fraction x capacity) items.
  - round() rounds half up, as the contract does for fractional capacities. The ghost size is
    max(0, capacity - round(small_fraction x capacity)).
  - "M is empty" is read as "M has no item that is not requested in this step". When S is large
    enough but all its items are requested, M is used instead. So the loop always has an item to take.
  - All victims of a step are chosen before its misses are inserted, as in the step order of
    docs/semantics.md. A missed item is looked up in G at insertion time, after this step's victims
    have entered G and possibly pushed it out.

Representation: dense [N] arrays. S and M share one sequence counter, and an item takes a new number
whenever it enters the newest end of either queue, so each queue's order is sequence order among its
members. G is a membership mask with its own sequence counter.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from specmd_jax.policies.base import INT_MAX, EvictionPolicy, StepInfo, assign_sequence

MAX_FREQUENCY = 3


class S3FifoParams(NamedTuple):
    """Hyper-parameters; both are traced data, so a sweep over them shares one compilation.

    small_fraction is the share of the capacity that S may hold before eviction takes from it, in
    [0, 1], applied in millionths. promote_threshold is the frequency at which the oldest item of S
    moves to M instead of being evicted. `check_params` validates both on the host; inside the scan
    small_fraction is also clipped to [0, 1].
    """

    small_fraction: float = 0.1
    promote_threshold: int = 1


class S3FifoState(NamedTuple):
    in_main: jax.Array  # bool [N], True for an item of M, False for an item of S (resident items only)
    frequency: jax.Array  # int32 [N], 0 .. MAX_FREQUENCY
    seq: jax.Array  # int32 [N], position in S or M: a larger number is newer
    counter: jax.Array  # int32 scalar, next unused number of `seq`
    in_ghost: jax.Array  # bool [N], membership of G
    ghost_seq: jax.Array  # int32 [N], order of entry into G: a larger number is newer
    ghost_counter: jax.Array  # int32 scalar, next unused number of `ghost_seq`


def _init(num_items: int, params: S3FifoParams) -> S3FifoState:
    del params
    return S3FifoState(
        in_main=jnp.zeros(num_items, bool),
        frequency=jnp.zeros(num_items, jnp.int32),
        seq=jnp.zeros(num_items, jnp.int32),
        counter=jnp.zeros((), jnp.int32),
        in_ghost=jnp.zeros(num_items, bool),
        ghost_seq=jnp.zeros(num_items, jnp.int32),
        ghost_counter=jnp.zeros((), jnp.int32),
    )


def _on_hits(state: S3FifoState, params, info: StepInfo) -> S3FifoState:
    del params
    raised = jnp.minimum(state.frequency + 1, MAX_FREQUENCY)
    return state._replace(frequency=jnp.where(info.hits, raised, state.frequency))


MICRO = 1_000_000
"""small_fraction is applied in millionths, so the slot arithmetic below is exact in int32."""


def small_share(small_fraction: jax.Array, capacity: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Return small_fraction x capacity as (whole slots, remainder in millionths of a slot), both int32.

    small_fraction is clipped to [0, 1] and rounded to the nearest millionth. A float32 value of a
    fraction with at most 6 decimals is within 0.1 millionth of it, so that rounding recovers the
    decimal exactly and 0.15 x 100 is exactly 15. The product is split so that no intermediate exceeds
    int32. NOTE: this is true only for capacities below 2,147,000 slots.
    """
    fraction = jnp.clip(jnp.asarray(small_fraction, jnp.float32), 0.0, 1.0)
    micros = jnp.round(fraction * MICRO).astype(jnp.int32)
    capacity = jnp.asarray(capacity, jnp.int32)
    # micros x capacity = (thousands x 1000 + units) x capacity, where thousands <= 1000 and units < 1000.
    thousands_times_capacity = (micros // 1000) * capacity
    whole = thousands_times_capacity // 1000
    below_whole = (thousands_times_capacity % 1000) * 1000 + (micros % 1000) * capacity
    return whole + below_whole // MICRO, below_whole % MICRO


def small_queue_min_items(small_fraction: jax.Array, capacity: jax.Array) -> jax.Array:
    """Return the least S size that is at least small_fraction x capacity: the ceiling of the product."""
    whole, remainder = small_share(small_fraction, capacity)
    return whole + (remainder > 0).astype(jnp.int32)


def ghost_size(small_fraction: jax.Array, capacity: jax.Array) -> jax.Array:
    """Return capacity - round(small_fraction x capacity), rounding half up, clamped at 0 (int32)."""
    whole, remainder = small_share(small_fraction, capacity)
    rounded = whole + (remainder >= MICRO // 2).astype(jnp.int32)
    return jnp.maximum(jnp.asarray(capacity, jnp.int32) - rounded, 0)


def _choose_victims(state: S3FifoState, params: S3FifoParams, info: StepInfo, eligible, num_victims):
    promote_threshold = jnp.asarray(params.promote_threshold, jnp.int32)
    small_min_items = small_queue_min_items(params.small_fraction, info.capacity)
    max_ghosts = ghost_size(params.small_fraction, info.capacity)
    # Resident items that are not eligible (requested in this step, or protected prefetches) count as
    # queue members but are never taken.
    in_queue = info.resident

    def unfinished(carry):
        _, victims, found = carry
        # The second test only guards against a malformed call, because the engine never requests
        # more victims than there are eligible items.
        return (found < num_victims) & jnp.any(eligible & ~victims)

    def take_one(carry):
        state, victims, found = carry
        candidates = eligible & ~victims
        small_candidates = candidates & ~state.in_main
        main_candidates = candidates & state.in_main
        small_count = jnp.sum(in_queue & ~victims & ~state.in_main, dtype=jnp.int32)
        small_is_full = small_count >= small_min_items
        from_small = jnp.any(small_candidates) & (small_is_full | ~jnp.any(main_candidates))

        # The oldest candidate of the chosen queue; sequence numbers of queued items are distinct.
        pool = jnp.where(from_small, small_candidates, main_candidates)
        oldest_seq = jnp.min(jnp.where(pool, state.seq, INT_MAX))
        item = pool & (state.seq == oldest_seq)
        item_frequency = jnp.sum(jnp.where(item, state.frequency, 0))

        # An item that is not evicted goes to the newest end of M, either promoted from S with
        # frequency 0 or reinserted in M with its frequency lowered by one.
        moves_to_main = jnp.where(from_small, item_frequency >= promote_threshold, item_frequency > 0)
        moved = item & moves_to_main
        main_frequency = jnp.where(from_small, 0, item_frequency - 1)
        evicted = item & ~moves_to_main
        state = state._replace(
            in_main=state.in_main | moved,
            frequency=jnp.where(moved, main_frequency, state.frequency),
            seq=jnp.where(moved, state.counter, state.seq),
            counter=state.counter + moves_to_main.astype(jnp.int32),
        )

        # A victim taken from S enters G as its newest entry. G then drops its oldest entry if it
        # contains more than max_ghosts ids. Entries arrive one at a time, so one removal restores
        # the bound.
        to_ghost = evicted & from_small
        in_ghost = state.in_ghost | to_ghost
        ghost_seq = jnp.where(to_ghost, state.ghost_counter, state.ghost_seq)
        over_limit = jnp.sum(in_ghost, dtype=jnp.int32) > max_ghosts
        oldest_ghost = jnp.min(jnp.where(in_ghost, ghost_seq, INT_MAX))
        in_ghost = in_ghost & ~(over_limit & (ghost_seq == oldest_ghost))
        state = state._replace(
            in_ghost=in_ghost,
            ghost_seq=ghost_seq,
            ghost_counter=state.ghost_counter + jnp.any(to_ghost).astype(jnp.int32),
        )
        return state, victims | evicted, found + jnp.any(evicted).astype(jnp.int32)

    carry = (state, jnp.zeros_like(eligible), jnp.zeros((), jnp.int32))
    state, victims, _ = jax.lax.while_loop(unfinished, take_one, carry)
    return victims, state


def _on_inserts(state: S3FifoState, params, info: StepInfo) -> S3FifoState:
    del params
    # G is consulted after this step's victims entered it (see the module docstring).
    ghost_hits = info.misses & state.in_ghost
    seq, counter = assign_sequence(state.seq, state.counter, info.misses)
    return state._replace(
        in_main=jnp.where(info.misses, ghost_hits, state.in_main),
        frequency=jnp.where(info.misses, 0, state.frequency),
        seq=seq,
        counter=counter,
        in_ghost=state.in_ghost & ~info.misses,
    )


def _check_params(params: S3FifoParams) -> None:
    fraction, threshold = params.small_fraction, params.promote_threshold
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(f"s3fifo: invalid small_fraction {fraction!r}: expected a number in (0, 1), such as 0.1")
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 1 <= threshold <= MAX_FREQUENCY:
        raise ValueError(
            f"s3fifo: invalid promote_threshold {threshold!r}: expected an integer in [1, {MAX_FREQUENCY}] "
            f"(frequencies are capped at {MAX_FREQUENCY})"
        )


S3FIFO = EvictionPolicy(
    name="s3fifo",
    init=_init,
    on_hits=_on_hits,
    choose_victims=_choose_victims,
    on_inserts=_on_inserts,
    default_params=S3FifoParams,
    check_params=_check_params,
    description="S3-FIFO: small FIFO S, main FIFO M with reinsertion, ghost FIFO G of ids evicted from S",
)

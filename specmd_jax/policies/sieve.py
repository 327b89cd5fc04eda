"""SIEVE eviction, from Zhang et al., "SIEVE is Simpler than LRU: an Efficient Turn-Key Eviction Algorithm
for Web Caches", NSDI 2024.

Rule (docs/semantics.md): one FIFO queue ordered by insertion, a visited bit per item and a hand that
points at a queue position, initially the oldest item. A hit sets the visited bit. To choose a victim the
hand walks from its position toward newer items, wrapping from the newest to the oldest. It passes over an
item requested in this step unchanged, and it clears the bit of a visited item and passes over it. The
first other item is the victim, and the hand then points at the next newer item (the oldest item when the
victim was the newest). Inserted items enter as the newest, with the bit clear.

Representation: each item keeps the sequence number of its insertion, so queue order is sequence order.
The hand is a sequence number `hand_seq` and points at the queue item with the smallest sequence number
>= `hand_seq`; with no such item it points at the oldest item. Items leave the queue only as victims of
the hand, so the item the hand points at stays the same until the hand moves. After a victim with
sequence number v the hand becomes v + 1 when a newer item is queued, else 0 (the oldest). Items that are
inserted later, at the newest end, then cannot capture the hand.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from specmd_jax.policies.base import INT_MAX, EvictionPolicy, StepInfo, assign_sequence


class SieveState(NamedTuple):
    seq: jax.Array  # int32 [N], insertion sequence number (meaningful for resident items only)
    visited: jax.Array  # bool [N]
    hand_seq: jax.Array  # int32 scalar, the hand (see the module docstring)
    counter: jax.Array  # int32 scalar, next unused sequence number


def _init(num_items: int, params) -> SieveState:
    del params
    return SieveState(
        seq=jnp.zeros(num_items, jnp.int32),
        visited=jnp.zeros(num_items, bool),
        hand_seq=jnp.zeros((), jnp.int32),
        counter=jnp.zeros((), jnp.int32),
    )


def _on_hits(state: SieveState, params, info: StepInfo) -> SieveState:
    del params
    return state._replace(visited=state.visited | info.hits)


def _first_from_hand(mask: jax.Array, seq: jax.Array, hand_seq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Return (found, sequence number) of the first masked item that the hand reaches.

    The hand first reaches items with seq >= hand_seq in ascending order, then wraps to the others.
    """
    before_wrap = mask & (seq >= hand_seq)
    reached_first = jnp.where(jnp.any(before_wrap), before_wrap, mask)
    return jnp.any(mask), jnp.min(jnp.where(reached_first, seq, INT_MAX))


def _choose_victims(state: SieveState, params, info: StepInfo, eligible: jax.Array, num_victims: jax.Array):
    del params
    # Resident items that are not eligible (requested in this step, or protected prefetches) stay in
    # the queue but are never victims.
    in_queue = info.resident

    def evict_one(_, carry):
        visited, hand_seq, victims = carry
        candidates = eligible & ~victims
        queued = in_queue & ~victims
        wrapped = state.seq < hand_seq

        # The victim is the first unvisited candidate on the hand's way. When every candidate is
        # visited, the hand clears them all in one full turn and stops at the first of them.
        found_unvisited, unvisited_seq = _first_from_hand(candidates & ~visited, state.seq, hand_seq)
        _, first_seq = _first_from_hand(candidates, state.seq, hand_seq)
        victim_seq = jnp.where(found_unvisited, unvisited_seq, first_seq)
        victim = candidates & (state.seq == victim_seq)

        # Visited candidates that the hand passes before the victim lose their bit; requested items
        # keep theirs. The hand passes an item first when the item comes before the wrap and the
        # victim after it, or when both are on the same side of the wrap and the item is older.
        victim_wrapped = victim_seq < hand_seq
        passed = (victim_wrapped & ~wrapped) | ((wrapped == victim_wrapped) & (state.seq < victim_seq))
        cleared = candidates & visited & (passed | ~found_unvisited)
        visited = visited & ~cleared

        # The hand moves to the next newer queued item, or wraps to the oldest when there is none.
        has_newer = jnp.any(queued & ~victim & (state.seq > victim_seq))
        hand_seq = jnp.where(has_newer, victim_seq + 1, 0)
        return visited, hand_seq, victims | victim

    carry = (state.visited, state.hand_seq, jnp.zeros_like(eligible))
    visited, hand_seq, victims = jax.lax.fori_loop(0, num_victims, evict_one, carry)
    return victims, state._replace(visited=visited, hand_seq=hand_seq)


def _on_inserts(state: SieveState, params, info: StepInfo) -> SieveState:
    del params
    seq, counter = assign_sequence(state.seq, state.counter, info.misses)
    return state._replace(seq=seq, counter=counter, visited=state.visited & ~info.misses)


SIEVE = EvictionPolicy(
    name="sieve",
    init=_init,
    on_hits=_on_hits,
    choose_victims=_choose_victims,
    on_inserts=_on_inserts,
    description="SIEVE: FIFO queue with visited bits and a hand that skips visited items once",
)

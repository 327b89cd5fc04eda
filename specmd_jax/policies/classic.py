"""Textbook eviction policies: LRU, FIFO, LFU, seeded Random and Belady's MIN.

Tie rules (part of the simulation contract in docs/semantics.md):
  LRU    evicts the smallest (step of last use, flat id)
  FIFO   evicts the smallest (step of insertion, flat id)
  LFU    evicts the smallest (requests since insertion, step of last use, flat id)
  Random evicts the items with the smallest uniform draw of this step, ties to the smallest flat id
  Belady evicts the item whose next request is furthest away (never = infinitely far), ties to the
         smallest flat id; it always admits the missed expert (demand paging)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from specmd_jax.policies import queue
from specmd_jax.policies.base import NEVER, EvictionPolicy, StepInfo, assign_sequence, select_smallest


class SequenceState(NamedTuple):
    """Per-item sequence numbers: a larger number means a later (step, flat id)."""

    seq: jax.Array  # int32 [N]
    counter: jax.Array  # int32 scalar, next unused sequence number


def _init_sequence(num_items: int, params) -> SequenceState:
    del params
    return SequenceState(jnp.zeros(num_items, jnp.int32), jnp.zeros((), jnp.int32))


def _keep(state, params, info: StepInfo):
    del params, info
    return state


def _init_queue(num_items: int, params) -> queue.QueueState:
    del params
    return queue.QueueState(jnp.full(num_items, queue.NOT_QUEUED, jnp.int32))


# LRU: the queue is ordered by (step of last use, flat id). Every request of the step, hit or miss,
# joins the tail in ascending flat id, so every hit is a mover.
def _lru_victims(state: queue.QueueState, params, info: StepInfo, eligible, num_victims):
    del params
    step = queue.first_eligible(state.rank, info, eligible, num_victims)
    valid = info.request_positions >= 0
    rank = queue.advance(state.rank, info, step, num_victims, info.request_hit, queue.order_in_slots(valid))
    return step.victims, queue.QueueState(rank)


# FIFO: ordered by (step of insertion, flat id); hits do not move, misses join the tail.
def _fifo_victims(state: queue.QueueState, params, info: StepInfo, eligible, num_victims):
    del params
    step = queue.first_eligible(state.rank, info, eligible, num_victims)
    misses = (info.request_positions >= 0) & ~info.request_hit
    rank = queue.advance(state.rank, info, step, num_victims, None, queue.order_in_slots(misses))
    return step.victims, queue.QueueState(rank)


LRU = EvictionPolicy(
    name="lru",
    init=_init_queue,
    on_hits=_keep,
    choose_victims=_lru_victims,
    on_inserts=_keep,
    description="least recently used",
)

FIFO = EvictionPolicy(
    name="fifo",
    init=_init_queue,
    on_hits=_keep,
    choose_victims=_fifo_victims,
    on_inserts=_keep,
    description="first in, first out",
)


class LfuState(NamedTuple):
    count: jax.Array  # int32 [N], requests since insertion
    last_use: SequenceState


def _lfu_init(num_items: int, params) -> LfuState:
    return LfuState(jnp.zeros(num_items, jnp.int32), _init_sequence(num_items, params))


def _lfu_victims(state: LfuState, params, info: StepInfo, eligible, num_victims):
    del params
    victims = select_smallest(eligible, num_victims, info.max_victims, state.count, state.last_use.seq)
    return victims, state


def _lfu_on_inserts(state: LfuState, params, info: StepInfo) -> LfuState:
    del params
    # A hit adds one request; an insertion restarts the count at 1 (counts are lost on eviction).
    count = jnp.where(info.hits, state.count + 1, jnp.where(info.misses, 1, state.count))
    return LfuState(count, SequenceState(*assign_sequence(state.last_use.seq, state.last_use.counter, info.requested)))


LFU = EvictionPolicy(
    name="lfu",
    init=_lfu_init,
    on_hits=_keep,
    choose_victims=_lfu_victims,
    on_inserts=_lfu_on_inserts,
    description="least frequently used since insertion",
)


def _random_init(num_items: int, params) -> tuple:
    del num_items, params
    return ()


def _random_victims(state, params, info: StepInfo, eligible, num_victims):
    del params
    # One 31-bit draw per item of the pool, from the step's key; ties go to the smallest flat id.
    draws = jax.random.randint(info.rng, eligible.shape, 0, NEVER, dtype=jnp.int32)
    return select_smallest(eligible, num_victims, info.max_victims, draws), state


RANDOM = EvictionPolicy(
    name="random",
    init=_random_init,
    on_hits=_keep,
    choose_victims=_random_victims,
    on_inserts=_keep,
    description="uniform random victim, seeded",
)


class BeladyState(NamedTuple):
    next_use: jax.Array  # int32 [N], step of each resident item's next request, NEVER if none


def _belady_init(num_items: int, params) -> BeladyState:
    del params
    return BeladyState(jnp.full(num_items, NEVER, jnp.int32))


def _belady_victims(state: BeladyState, params, info: StepInfo, eligible, num_victims):
    del params
    num_items = eligible.shape[0]
    if info.num_steps * num_items < NEVER:
        # One distinct int32 key, furthest next request first and ties to the smallest position, which
        # lets the selection skip its tie-break pass. NEVER maps to distance 0 (evicted first).
        distance = info.num_steps - jnp.minimum(state.next_use, info.num_steps)
        key = distance * num_items + jnp.arange(num_items, dtype=jnp.int32)
        return select_smallest(eligible, num_victims, info.max_victims, key, unique=True), state
    furthest_first = -state.next_use
    return select_smallest(eligible, num_victims, info.max_victims, furthest_first), state


def _belady_on_inserts(state: BeladyState, params, info: StepInfo) -> BeladyState:
    del params
    return BeladyState(jnp.where(info.requested, info.next_use, state.next_use))


BELADY = EvictionPolicy(
    name="belady",
    init=_belady_init,
    on_hits=_keep,
    choose_victims=_belady_victims,
    on_inserts=_belady_on_inserts,
    description="Belady's MIN with demand paging (always admits the missed expert)",
)

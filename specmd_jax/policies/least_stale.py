"""Least-Stale eviction, from "SpecMD: A Comprehensive Study On Speculative Expert Prefetching" (2026).

The cache keeps two FIFO queues, CURRENT and STALE. At the start of each forward pass every entry of
CURRENT moves, in order, to the tail of STALE. A hit on an entry of STALE moves it to the tail of CURRENT
(a hit in CURRENT changes nothing). A newly inserted expert goes to the tail of CURRENT. The victim is the
head of STALE not requested in this step; only when STALE has none, the head of CURRENT not requested in
this step.

Representation: each item has a sequence number from one counter, taken when it enters the tail of
CURRENT, and the pass in which it did so. An item is in CURRENT exactly when that pass is the current
pass. Moving all of CURRENT to the tail of STALE keeps their relative order, and every STALE entry entered
CURRENT in an earlier pass, so it has a smaller sequence number than every CURRENT entry. Queue order is
therefore plain sequence order, which the victim choice uses directly.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from specmd_jax.policies.base import EvictionPolicy, StepInfo, assign_sequence, select_smallest


class LeastStaleState(NamedTuple):
    seq: jax.Array  # int32 [N], position in the queue order
    entered_pass: jax.Array  # int32 [N], pass in which the item last entered CURRENT, -1 never
    counter: jax.Array  # int32 scalar


def _init(num_items: int, params) -> LeastStaleState:
    del params
    return LeastStaleState(
        jnp.zeros(num_items, jnp.int32), jnp.full(num_items, -1, jnp.int32), jnp.zeros((), jnp.int32)
    )


def _in_current(state: LeastStaleState, info: StepInfo) -> jax.Array:
    return state.entered_pass == info.pass_index


def _on_hits(state: LeastStaleState, params, info: StepInfo) -> LeastStaleState:
    del params
    stale_hits = info.hits & ~_in_current(state, info)
    seq, counter = assign_sequence(state.seq, state.counter, stale_hits)
    entered = jnp.where(stale_hits, info.pass_index, state.entered_pass)
    return LeastStaleState(seq, entered, counter)


def _choose_victims(state: LeastStaleState, params, info: StepInfo, eligible, num_victims):
    del params
    # Queue order (STALE before CURRENT, FIFO within each) equals sequence order, see the module
    # docstring; the reference simulator keeps the two queues literally and checks this.
    return select_smallest(eligible, num_victims, info.max_victims, state.seq, unique=True), state


def _on_inserts(state: LeastStaleState, params, info: StepInfo) -> LeastStaleState:
    del params
    seq, counter = assign_sequence(state.seq, state.counter, info.misses)
    entered = jnp.where(info.misses, info.pass_index, state.entered_pass)
    return LeastStaleState(seq, entered, counter)


LEAST_STALE = EvictionPolicy(
    name="least-stale",
    init=_init,
    on_hits=_on_hits,
    choose_victims=_choose_victims,
    on_inserts=_on_inserts,
    description="SpecMD Least-Stale: STALE queue first, then CURRENT, FIFO within each",
)

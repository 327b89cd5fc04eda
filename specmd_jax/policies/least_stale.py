"""Least-Stale eviction, from "SpecMD: A Comprehensive Study On Speculative Expert Prefetching" (2026).

The cache keeps two FIFO queues, CURRENT and STALE. At the start of each forward pass every entry of
CURRENT moves, in order, to the tail of STALE. A hit on an entry of STALE moves it to the tail of CURRENT
(a hit in CURRENT changes nothing). A newly inserted expert goes to the tail of CURRENT. The victim is the
head of STALE not requested in this step; only when STALE has none, the head of CURRENT not requested in
this step.

Representation: the two queues are kept as one rank order (`specmd_jax.policies.queue`), STALE first.
Moving all of CURRENT to the tail of STALE at a pass start keeps that concatenated order, so nothing
moves then; only the queue membership changes. An item is in CURRENT exactly when the pass in which it
last entered CURRENT is the current pass. A hit on a STALE entry moves it to the tail (it joins CURRENT);
misses join the tail after those hits, each group in ascending expert id.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from specmd_jax.policies import queue
from specmd_jax.policies.base import EvictionPolicy, StepInfo


class LeastStaleState(NamedTuple):
    rank: jax.Array  # int32 [N], position in STALE + CURRENT (0 = head of STALE), NOT_QUEUED if absent
    entered_pass: jax.Array  # int32 [N], pass in which the item last entered CURRENT, -1 never


def _init(num_items: int, params) -> LeastStaleState:
    del params
    return LeastStaleState(jnp.full(num_items, queue.NOT_QUEUED, jnp.int32), jnp.full(num_items, -1, jnp.int32))


def _keep(state, params, info: StepInfo):
    del params, info
    return state


def _choose_victims(state: LeastStaleState, params, info: StepInfo, eligible, num_victims):
    del params
    step = queue.first_eligible(state.rank, info, eligible, num_victims)

    # Hits on STALE entries move to the tail first, then the misses join.
    in_current = queue.slot_values(state.entered_pass, info, -1) == info.pass_index
    stale_hits = info.request_hit & ~in_current
    misses = (info.request_positions >= 0) & ~info.request_hit
    num_stale_hits = jnp.sum(stale_hits, dtype=jnp.int32)
    tail_order = jnp.maximum(queue.order_in_slots(stale_hits), queue.order_in_slots(misses, num_stale_hits))
    rank = queue.advance(state.rank, info, step, num_victims, stale_hits, tail_order)

    joined = (info.request_positions >= 0) & (stale_hits | misses)
    targets = jnp.where(joined, info.request_positions, state.rank.shape[0])
    entered_pass = state.entered_pass.at[targets].set(info.pass_index, mode="drop")
    return step.victims, LeastStaleState(rank, entered_pass)


LEAST_STALE = EvictionPolicy(
    name="least-stale",
    init=_init,
    on_hits=_keep,
    choose_victims=_choose_victims,
    on_inserts=_keep,
    description="SpecMD Least-Stale: STALE queue first, then CURRENT, FIFO within each",
)

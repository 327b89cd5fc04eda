"""Exact FIFO totals with O(R) gathered state per pool step, by renumbered insertion numbers.

The generic scan keeps a dense queue rank for every one of the N items of a pool and updates it through
several passes over all of them in every step. FIFO needs much less. Its victim order, (step of insertion,
flat id), is fixed when an item is inserted, and hits do not move items, so the queue is a window of
consecutive numbers.

State of one pool at one capacity c:
  number[x]  the queue number of item x if it is resident; -1 if x was never inserted; a code <= -2 if
             it was evicted.
  F, M       the front and the next free number. The resident items hold exactly the numbers F .. M - 1,
             one each, in queue order (oldest first). Occupancy is M - F.

One step with requests x_1 < ... < x_r (r <= R) gathers the r values number[x_j]:
  1. x_j is a hit if number[x_j] >= 0. Let m be the number of misses and v = max(0, occupancy + m - c)
     the number of victims. Victims go oldest first among the resident items that are not requested.
  2. The front passes the numbers F, F + 1, ... until it has passed v items that are not requested.
     Those are evicted. The requested hits it passes (k of them) are skipped, and they stay the oldest
     residents. Sort the hits by number, h_0 < h_1 < ...: hit h_i is passed when h_i - F - i < v, because
     h_i - F - i unrequested items lie before it. As h_i - i never decreases, the skipped hits are a
     prefix. Each hit's index i is a count over the R request slots, so no sort and no loop is needed.
  3. Every item numbered in [F, F + v + k) gets the eviction code: the victims, and the skipped hits,
     which the next scatter renumbers at once. It is one compare and select over the N numbers, which
     costs less on XLA:CPU than finding the victims' ids.
  4. The skipped hits take the numbers F + v, ..., F + v + k - 1 in their order, and the misses take
     M, M + 1, ... in ascending expert id (the FIFO tie rule). The front becomes F + v and M grows by m.
     The window stays gapless: [F + v, F + v + k) holds the skipped hits, [F + v + k, M) the residents the
     front did not reach, [M, M + m) the misses.
The front never runs past M: a feasible capacity c is at least the step's r requests, so the v victims
exist among the resident items that are not requested.

Miss classes:
  compulsory  number[x] == -1. Every request leaves its item resident, so "never inserted" equals "never
              requested before".
  collision   in global scope an item is requested at most once per pass. Victims of pass p get the code
              -2 - p, so a miss whose code is that of the current pass was evicted during it. In per-layer
              scope a pool has one step per pass and a step never evicts its own requests, so there are
              no collision misses.
  capacity    every other miss.
Every miss is inserted, so evictions equal the misses minus the final occupancy.

Numbers are int32 and grow by at most R per step, so they overflow only after more than 2**31 / R steps
of one pool.

Layout and XLA:CPU costs (2 cores). All L per-layer pools advance in one step as P = L pools. Arrays are
[R, P, C]: the request slot leads, so sums over it add whole rows (sums over a middle axis measured several
times slower), and the capacity axis is last, so the gather and the scatter move rows of C values. Counting
misses in lower slots uses one bit per slot and a popcount. A cumulative sum lowers to a slow
reduce-window, and unrolled adds, which stack into a transpose, made the per-layer step 2.5x slower. For
the hits' order, the R x R comparison measured faster than bit sets over the offsets.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from specmd_jax.sim.engine import SweepTotals, per_layer_pool_totals

_NEVER_INSERTED = -1
_NOT_A_HIT = jnp.iinfo(jnp.int32).max
_WORD_BITS = 32
_EVICTED = -2  # an evicted item's number is _EVICTED, minus the pass of its eviction in global scope


class _FrontierState(NamedTuple):
    """FIFO state of P pools at all C capacities (see the module docstring); the capacity axis is last."""

    number: jax.Array  # int32 [P, N, C]: queue number if resident, -1 never inserted, <= -2 evicted
    front: jax.Array  # int32 [P, C], F
    counter: jax.Array  # int32 [P, C], M


def _initial_state(num_pools: int, num_items: int, num_capacities: int) -> _FrontierState:
    zero = jnp.zeros((num_pools, num_capacities), jnp.int32)
    return _FrontierState(jnp.full((num_pools, num_items, num_capacities), _NEVER_INSERTED, jnp.int32), zero, zero)


def order_among_flags(flags: jax.Array) -> jax.Array:
    """Count, for bool [R, ...] flags, the set flags at smaller indices of axis 0, as int32.

    With R <= 32, one bit per index and a popcount below each index's bit give elementwise work and one
    sum. A cumulative sum lowers to a reduce-window on XLA:CPU: in a scan body, 8 slots of a [16, 8, 16]
    array took 3.1 us against 0.4 us for a plain sum (one microbenchmark). Larger R uses unrolled adds.
    """
    num_slots = flags.shape[0]
    if num_slots > _WORD_BITS:
        counts = [jnp.zeros(flags.shape[1:], jnp.int32)]
        for index in range(1, num_slots):
            counts.append(counts[-1] + flags[index - 1].astype(jnp.int32))
        return jnp.stack(counts)
    one = jnp.uint32(1)
    shape = (num_slots,) + (1,) * (flags.ndim - 1)
    below = (one << jnp.arange(num_slots, dtype=jnp.uint32).reshape(shape)) - one
    bits = jnp.sum(jnp.where(flags, below + one, jnp.uint32(0)), axis=0, dtype=jnp.uint32)  # distinct bits: an OR
    return jax.lax.population_count(bits & below).astype(jnp.int32)


def _pool_step(state: _FrontierState, positions, capacities, evicted_code):
    """Advance P pools at every capacity [C] by one step. `positions` int32 [R, P] are ascending ids, -1 padded.

    Returns the new state, the hits and misses bool [R, P, C], and the requests' numbers before the step
    int32 [R, P, C]. Victims get `evicted_code`. The steps are those of the module docstring.
    """
    num_items = state.number.shape[1]
    pool = jnp.arange(positions.shape[1], dtype=jnp.int32)[None, :]
    used = positions >= 0
    target = jnp.where(used, positions, num_items)
    number = jnp.where(used[..., None], state.number[pool, jnp.where(used, positions, 0)], _NEVER_INSERTED)

    # Step 1: hits and the number of victims.
    hit = used[..., None] & (number >= 0)
    miss = used[..., None] & ~hit
    num_misses = jnp.sum(miss, axis=0, dtype=jnp.int32)
    num_victims = jnp.maximum(0, state.counter - state.front + num_misses - capacities)

    # Step 2: the front passes num_victims unrequested items and skips the hits among them.
    offset = jnp.where(hit, number - state.front, _NOT_A_HIT)
    hit_order = jnp.sum(offset[None] < offset[:, None], axis=1, dtype=jnp.int32)
    skipped = hit & (offset - hit_order < num_victims)
    passed = state.front + num_victims + jnp.sum(skipped, axis=0, dtype=jnp.int32)

    # Step 3: every resident numbered below `passed` is a victim or a skipped hit. A uint32 view sends
    # the negative codes of the items that are not resident past every number.
    below = state.number.astype(jnp.uint32) < passed[:, None, :].astype(jnp.uint32)
    numbers = jnp.where(below, evicted_code, state.number)

    # Step 4: new numbers for the skipped hits and the misses.
    skipped_number = state.front + num_victims + hit_order
    new_number = jnp.where(miss, state.counter + order_among_flags(miss), jnp.where(skipped, skipped_number, number))
    numbers = numbers.at[pool, target].set(new_number, mode="drop")
    return _FrontierState(numbers, state.front + num_victims, state.counter + num_misses), hit, miss, number


def _occupancy(state: _FrontierState) -> jax.Array:
    return state.counter - state.front


def fifo_per_layer_hits(capacities: jax.Array, experts: jax.Array, *, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Return FIFO's hits int32 [C, L] and the items each layer requested int32 [L], in per-layer scope.

    `experts` is `StepRequests.experts`, int32 [T, L, R]; the layers' pools are independent.
    """
    num_layers, num_capacities = experts.shape[1], capacities.shape[0]

    def body(carry, positions):
        state, hits = carry
        state, hit, _, _ = _pool_step(state, positions.T, capacities, _EVICTED)
        return (state, hits + jnp.sum(hit, axis=0, dtype=jnp.int32)), None

    init = (_initial_state(num_layers, num_experts, num_capacities), jnp.zeros((num_layers, num_capacities), jnp.int32))
    (state, hits), _ = jax.lax.scan(body, init, experts)
    # Every capacity inserts every requested item, so any capacity's column counts the items seen.
    seen = jnp.sum(state.number[:, :, :1] != _NEVER_INSERTED, axis=(1, 2), dtype=jnp.int32)
    return hits.T, seen


@functools.partial(jax.jit, static_argnames=("scope", "num_experts"))
def simulate_fifo_frontier(capacities: jax.Array, experts: jax.Array, *, scope: str, num_experts: int) -> SweepTotals:
    """FIFO totals for every capacity [C] (slots per pool) in one scan; fields have a leading axis C.

    `experts` is `StepRequests.experts`, int32 [T, L, R]. Capacities must be feasible (at least the largest
    request set of a step), as `specmd_jax.sim.check_capacity` checks; this function does not check them.
    """
    num_passes, num_layers, num_slots = experts.shape
    num_capacities = capacities.shape[0]

    if scope == "per-layer":
        hits, seen = fifo_per_layer_hits(capacities, experts, num_experts=num_experts)
        return per_layer_pool_totals(experts, capacities, hits, seen)

    if scope != "global":
        raise ValueError(f"invalid scope '{scope}': expected 'global' or 'per-layer'")
    requests_per_layer = jnp.sum(experts >= 0, axis=(0, 2), dtype=jnp.int32)
    offsets = (jnp.arange(num_layers, dtype=jnp.int32) * num_experts)[None, :, None]
    positions = jnp.where(experts >= 0, experts + offsets, -1).reshape(num_passes * num_layers, num_slots)
    layers = jnp.tile(jnp.arange(num_layers, dtype=jnp.int32), num_passes)
    pass_indices = jnp.repeat(jnp.arange(num_passes, dtype=jnp.int32), num_layers)

    def body(carry, xs):
        state, hits, compulsory, collision = carry
        step_positions, layer, pass_index = xs
        # An item evicted in this pass carries the code of this pass, which makes its next miss in the
        # pass a collision.
        code = _EVICTED - pass_index
        state, hit, miss, number = _pool_step(state, step_positions[:, None], capacities, code)
        hits = hits.at[:, layer].add(jnp.sum(hit[:, 0], axis=0, dtype=jnp.int32))
        compulsory = compulsory.at[:, layer].add(jnp.sum(miss[:, 0] & (number[:, 0] == _NEVER_INSERTED), axis=0, dtype=jnp.int32))
        collision = collision.at[:, layer].add(jnp.sum(miss[:, 0] & (number[:, 0] == code), axis=0, dtype=jnp.int32))
        return (state, hits, compulsory, collision), None

    zero = jnp.zeros((num_capacities, num_layers), jnp.int32)
    init = (_initial_state(1, num_layers * num_experts, num_capacities), zero, zero, zero)
    (state, hits, compulsory, collision), _ = jax.lax.scan(body, init, (positions, layers, pass_indices))
    misses = requests_per_layer[None, :] - hits
    return SweepTotals(
        requests=jnp.broadcast_to(requests_per_layer.sum(), (num_capacities,)),
        hits=hits.sum(-1),
        compulsory=compulsory.sum(-1),
        capacity=(misses - compulsory - collision).sum(-1),
        collision=collision.sum(-1),
        evictions=misses.sum(-1) - _occupancy(state)[0],
        requests_per_layer=jnp.broadcast_to(requests_per_layer, (num_capacities, num_layers)),
        hits_per_layer=hits,
    )

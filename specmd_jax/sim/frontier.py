"""Exact FIFO totals with O(R) work per pool step, by insertion numbers and an eviction front.

The generic scan keeps a dense queue rank for every one of the N items of a pool and touches all of them in
every step. FIFO needs much less: its victim order, (step of insertion, flat id), is fixed when an item is
inserted, and hits do not move items. So each item stores the number of its latest insertion, and the cache
is described by a few scalars and a short list.

State of one pool at one capacity c:
  ins[x]   insertion number of item x's latest insertion, -1 if x was never inserted.
  M        number of insertions so far. A step's misses take the numbers M, M + 1, ... in ascending
           expert id, so the order of insertion numbers is the FIFO order (step of insertion, flat id).
  F        the front. Every insertion number in [F, M) belongs to exactly one resident item.
  pinned   the resident items whose insertion number is < F, at most R of them, ordered by insertion
           number. They were requested in the step when the front passed them, so they were skipped
           instead of evicted, and they are the oldest residents.
Item x is resident if and only if ins[x] >= F or x is pinned. Occupancy is (M - F) + len(pinned).

One step with requests x_1 < ... < x_r (r <= R) needs only the r values ins[x_j] and an r x R comparison
with the pinned list:
  1. x_j is a hit if ins[x_j] >= F or x_j is pinned. Let m be the number of misses and
     v = max(0, occupancy + m - c) the number of victims.
  2. Victims go in insertion order among the resident items that are not requested. The pinned items come
     first. If the u pinned items that are not requested number at least v, the oldest v of them are
     evicted and the front stays. Otherwise all u go, and the front passes over the items numbered F, F+1, ...
     evicting the next v - u items that are not requested and skipping the k requested ones among them:
     F' = F + (v - u) + k. The requested normal hits in [F, F') become the new tail of the pinned list,
     after the old pinned items that are requested now (those are older).
  3. The misses get ins[x] = M, M + 1, ..., and M grows by m.
For k, sort the requested normal hits by insertion number, h_0 < h_1 < ... . The front skips h_i exactly
when h_i < F + (v - u) + i, because i requested items before it are skipped first. As h_i - i never
decreases, the skipped ones are a prefix and k is their number. A count over the R slots computes each
item's position i, so no sort and no loop is needed. The front never runs past M, because a feasible
capacity c is at least the step's r requests, so the v victims exist among the resident items that are not
requested.

The pinned list never exceeds R entries. In a step where the front moves, every item that stays or becomes
pinned is requested in that step, and a step requests at most R distinct items. In a step where the front
stays, the list only loses entries.

Miss classes:
  compulsory  ins[x] == -1. Every request leaves its item resident, so "never inserted" equals "never
              requested before".
  collision   in global scope an item is requested at most once per pass, so a miss was evicted during
              the current pass if and only if it was resident when the pass started. The pool keeps a copy
              of F and of the pinned list from the start of each pass (before its layer-0 step), and a
              miss x with ins[x] >= 0 is a collision if ins[x] >= that F or x was in that pinned list.
              ins[x] still holds the number from before the pass because x was not inserted since.
              In per-layer scope a pool sees one step per pass and a step never evicts its own requests,
              so there are no collision misses.
  capacity    every other miss.
Every miss is inserted, so evictions equal the misses minus the final occupancy.

A step gathers R insertion numbers and scatters at most R, so no step work grows with N. The state is still
N insertion numbers per pool and capacity. Insertion numbers are int32 and grow by at most R per step, so
they overflow only after more than 2**31 / R steps of one pool.

Measured through `run_sweep` on 2 XLA host devices (2 cores), 16 capacities, synthetic OLMoE routing (16
layers x 64 experts, 8 requests per step): 0.33 s instead of the generic scan's 0.71 s for 20,000 passes
in per-layer scope, and 0.22 s instead of 1.0 s for 5,000 passes in global scope.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from specmd_jax.sim.engine import SweepTotals

_NEVER_INSERTED = -1
_NO_ITEM = -1
_NO_HIT = jnp.iinfo(jnp.int32).max


class _FrontierState(NamedTuple):
    """FIFO state of one pool at all C capacities (see the module docstring); the capacity axis is last."""

    ins: jax.Array  # int32 [N, C], insertion number of the latest insertion, -1 never inserted
    front: jax.Array  # int32 [C], F
    counter: jax.Array  # int32 [C], M
    pinned: jax.Array  # int32 [R, C], pinned item ids by ascending insertion number, then -1 padding
    pass_front: jax.Array  # int32 [C], F at the start of the current pass (global scope only)
    pass_pinned: jax.Array  # int32 [R, C], pinned at the start of the current pass (global scope only)


class _StepCounts(NamedTuple):
    hits: jax.Array
    compulsory: jax.Array
    collision: jax.Array
    capacity: jax.Array


def _initial_state(num_items: int, num_slots: int, num_capacities: int) -> _FrontierState:
    zero = jnp.zeros(num_capacities, jnp.int32)
    no_items = jnp.full((num_slots, num_capacities), _NO_ITEM, jnp.int32)
    ins = jnp.full((num_items, num_capacities), _NEVER_INSERTED, jnp.int32)
    return _FrontierState(ins, zero, zero, no_items, zero, no_items)


def _pool_step(state: _FrontierState, positions, capacities, pass_start, *, track_collisions: bool):
    """Advance one pool at every capacity [C] by one step. `positions` int32 [R] are ascending flat ids, -1 padded.

    Arrays are [R, C] (request slot, capacity) or [R, R, C]. The capacity axis is explicit and last, so
    each gather and scatter moves whole rows of C values. That measured about 1.7x faster per-layer than
    mapping the step over capacities.
    """
    num_items, num_slots = state.ins.shape[0], positions.shape[0]
    used = positions >= 0
    item = jnp.where(used, positions, 0)
    slot_ins = jnp.where(used[:, None], state.ins[item], _NEVER_INSERTED)

    # Step 1: hits and the number of victims.
    is_pinned = state.pinned >= 0
    pinned_match = used[:, None, None] & (item[:, None, None] == state.pinned[None, :, :])  # [request, pinned, C]
    pinned_hit = jnp.any(pinned_match, axis=1)
    normal_hit = used[:, None] & (slot_ins >= state.front)
    hit = pinned_hit | normal_hit
    miss = used[:, None] & ~hit
    num_misses = jnp.sum(miss, axis=0, dtype=jnp.int32)
    occupancy = state.counter - state.front + jnp.sum(is_pinned, axis=0, dtype=jnp.int32)
    num_victims = jnp.maximum(0, occupancy + num_misses - capacities)

    # Step 2a: victims among the pinned items that this step does not request, oldest first.
    unrequested_pinned = is_pinned & ~jnp.any(pinned_match, axis=0)
    unrequested_rank = jnp.cumsum(unrequested_pinned, axis=0, dtype=jnp.int32) - unrequested_pinned
    kept_pinned = is_pinned & ~(unrequested_pinned & (unrequested_rank < num_victims))
    front_victims = jnp.maximum(0, num_victims - jnp.sum(unrequested_pinned, axis=0, dtype=jnp.int32))

    # Step 2b: the front passes front_victims unrequested items and skips the requested ones among them.
    hit_ins = jnp.where(normal_hit, slot_ins, _NO_HIT)
    hit_order = jnp.sum(hit_ins[None, :, :] < hit_ins[:, None, :], axis=1, dtype=jnp.int32)
    skipped = normal_hit & (hit_ins - hit_order - state.front < front_victims)
    front = state.front + front_victims + jnp.sum(skipped, axis=0, dtype=jnp.int32)

    # New pinned list: the kept old entries in their order, then the skipped hits by insertion number.
    num_kept = jnp.sum(kept_pinned, axis=0, dtype=jnp.int32)
    kept_target = jnp.where(kept_pinned, jnp.cumsum(kept_pinned, axis=0, dtype=jnp.int32) - 1, num_slots)
    skipped_target = jnp.where(skipped, num_kept + hit_order, num_slots)
    entry = jnp.arange(num_slots, dtype=jnp.int32)[:, None, None]
    from_kept = kept_target[None, :, :] == entry  # [entry, old entry, C]
    from_skipped = skipped_target[None, :, :] == entry  # [entry, request, C]
    value = jnp.sum(jnp.where(from_kept, state.pinned[None], 0), axis=1)
    value = value + jnp.sum(jnp.where(from_skipped, item[None, :, None], 0), axis=1)
    pinned = jnp.where(jnp.any(from_kept, axis=1) | jnp.any(from_skipped, axis=1), value, _NO_ITEM)

    # Step 3: misses take the next insertion numbers in ascending expert id (the FIFO tie rule).
    miss_order = jnp.cumsum(miss, axis=0, dtype=jnp.int32) - 1
    rows = jnp.where(miss, state.counter + miss_order, slot_ins)
    ins = state.ins.at[jnp.where(used, item, num_items)].set(rows, mode="drop")
    counter = state.counter + num_misses

    compulsory = miss & (slot_ins == _NEVER_INSERTED)
    if track_collisions:
        pass_front = jnp.where(pass_start, state.front, state.pass_front)
        pass_pinned = jnp.where(pass_start, state.pinned, state.pass_pinned)
        was_pinned = jnp.any(used[:, None, None] & (item[:, None, None] == pass_pinned[None, :, :]), axis=1)
        collision = miss & ~compulsory & ((slot_ins >= pass_front) | was_pinned)
    else:
        pass_front, pass_pinned = state.pass_front, state.pass_pinned
        collision = jnp.zeros_like(miss)

    counts = _StepCounts(
        hits=jnp.sum(hit, axis=0, dtype=jnp.int32),
        compulsory=jnp.sum(compulsory, axis=0, dtype=jnp.int32),
        collision=jnp.sum(collision, axis=0, dtype=jnp.int32),
        capacity=jnp.sum(miss & ~compulsory & ~collision, axis=0, dtype=jnp.int32),
    )
    return _FrontierState(ins, front, counter, pinned, pass_front, pass_pinned), counts


def _occupancy(state: _FrontierState) -> jax.Array:
    return state.counter - state.front + jnp.sum(state.pinned >= 0, axis=0, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=("scope", "num_experts"))
def simulate_fifo_frontier(capacities: jax.Array, experts: jax.Array, *, scope: str, num_experts: int) -> SweepTotals:
    """FIFO totals for every capacity [C] (slots per pool) in one scan; fields have a leading axis C.

    `experts` is `StepRequests.experts`, int32 [T, L, R]. Capacities must be feasible (at least the largest
    request set of a step), as `specmd_jax.sim.check_capacity` checks; this function does not check them.
    """
    num_passes, num_layers, num_slots = experts.shape
    num_capacities = capacities.shape[0]
    requests_per_layer = jnp.sum(experts >= 0, axis=(0, 2), dtype=jnp.int32)

    def totals_from(counts: _StepCounts, occupancy) -> SweepTotals:
        # The counts fields are [C, L], and occupancy is [C], summed over pools.
        misses = requests_per_layer[None, :] - counts.hits
        return SweepTotals(
            requests=jnp.broadcast_to(requests_per_layer.sum(), (num_capacities,)),
            hits=counts.hits.sum(-1),
            compulsory=counts.compulsory.sum(-1),
            capacity=counts.capacity.sum(-1),
            collision=counts.collision.sum(-1),
            evictions=misses.sum(-1) - occupancy,
            requests_per_layer=jnp.broadcast_to(requests_per_layer, (num_capacities, num_layers)),
            hits_per_layer=counts.hits,
        )

    zero_counts = _StepCounts(*(jnp.zeros((num_capacities, num_layers), jnp.int32) for _ in _StepCounts._fields))

    if scope == "per-layer":
        step = jax.vmap(functools.partial(_pool_step, pass_start=True, track_collisions=False), in_axes=(0, 0, None))

        def body(carry, positions):
            states, sums = carry
            states, counts = step(states, positions, capacities)
            # Counts come out as [L, C]; the totals want [C, L].
            sums = jax.tree.map(lambda total, count: total + count.T, sums, counts)
            return (states, sums), None

        init = jax.tree.map(
            lambda leaf: jnp.broadcast_to(leaf, (num_layers,) + leaf.shape),
            _initial_state(num_experts, num_slots, num_capacities),
        )
        (states, sums), _ = jax.lax.scan(body, (init, zero_counts), experts)
        occupancy = jax.vmap(_occupancy)(states).sum(0)
        return totals_from(sums, occupancy)

    if scope != "global":
        raise ValueError(f"invalid scope '{scope}': expected 'global' or 'per-layer'")
    offsets = (jnp.arange(num_layers, dtype=jnp.int32) * num_experts)[None, :, None]
    positions = jnp.where(experts >= 0, experts + offsets, -1).reshape(num_passes * num_layers, num_slots)
    layers = jnp.tile(jnp.arange(num_layers, dtype=jnp.int32), num_passes)
    step = functools.partial(_pool_step, track_collisions=True)

    def body(carry, xs):
        states, sums = carry
        step_positions, layer = xs
        states, counts = step(states, step_positions, capacities, layer == 0)
        sums = jax.tree.map(lambda total, count: total.at[:, layer].add(count), sums, counts)
        return (states, sums), None

    init = _initial_state(num_layers * num_experts, num_slots, num_capacities)
    # Unrolling two steps measured ~1.3x faster here (XLA:CPU, 2 cores). In per-layer scope it did not help.
    (states, sums), _ = jax.lax.scan(body, (init, zero_counts), (positions, layers), unroll=2)
    return totals_from(sums, _occupancy(states))

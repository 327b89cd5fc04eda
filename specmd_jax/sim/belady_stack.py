"""Belady for every capacity in one pass, as Mattson's OPT stack, in `per-layer` scope.

Belady's priority of an item, the step of its next request, does not change until that request, and it
does not depend on the capacity. So Belady is a stack algorithm (Mattson et al., 1970). After every step
the cache of capacity C contains exactly the top C items of one stack. One scan over the trace then yields
the hit counts of all capacities, at the cost of about one configuration of the generic scan.
The hit counts do not depend on how ties between keys are broken (two tied items are both requested at
the same step, or never again), so only their uniqueness matters here.

Key of an item (expert e of the pool's layer). Let s be the global step (p * L + l) of its next request.
Let S be a step past the last step of the trace and past every next request. The key is:
  s * E + (E - 1 - e)    if it is requested again;
  S * E + (E - 1 - e)    if it is never requested again.
A larger key is a later next request, with ties to the smallest expert id: Belady's victim order. A resident
item requested now has the key t * E + (E - 1 - e), the smallest keys of the pool.

Stack update for a step with r requests. The requested items take the top r positions and get their new
keys. Every other item, at position y, moves to position max(y, e(y)), where e(y) is the position of the
r-th "event" for y among the positions other than y: a position that holds a requested item, holds an item
with a larger key, or lies at or beyond the stack size. The reason: y stays in the cache of capacity C
exactly when it was there (y < C) and the requests of the step leave a slot for it. Belady evicts the
largest keys first, so y keeps its slot when at least m_C items worse than y share the cache, where m_C is
the number of misses at capacity C; with C - size empty slots beyond the stack, this is the condition that
positions 0 .. C - 1 hold at least r events. So the smallest capacity whose cache keeps y is
max(y, e(y)) + 1.

Each step builds, for each of the N positions of a pool, the N event bits packed into 32-bit words, and
finds e(y) on the words: by clearing the lowest set bit r - 1 times when steps request few experts, else
by a binary search over popcounts. That is O(N * N / 32) words and no loop over the stack.
Per-layer pools have N = E items. A global pool has L * E items, for which this costs more than the generic
scan, so `global` scope takes the generic scan.

Miss classes: every miss is compulsory (the first request of each item, the same at every capacity) or a
capacity miss. There are no collision misses in per-layer scope, because a pool has one step per pass and
a step never evicts its own requests. Evictions equal the misses minus the final occupancy.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from specmd_jax.policies.base import NEVER
from specmd_jax.sim.engine import SweepTotals, per_layer_pool_totals

_EMPTY = np.iinfo(np.int32).max  # key of a position beyond the stack, larger than every real key
_WORD_BITS = 32


def fits_int32(next_step: np.ndarray, num_experts: int, padded_layers: int | None = None) -> bool:
    """Return whether every key for `StepRequests.next_step` [T, L, R] with E experts per layer fits in int32.

    With `padded_layers` (>= L), check the keys after steps p * L + l are renumbered p * padded_layers + l.
    """
    num_passes, num_layers, _ = next_step.shape
    padded_layers = num_layers if padded_layers is None else padded_layers
    # Renumbering p * L + l to p * padded_layers + l keeps the order, so only the largest finite next
    # step needs it (about 10x faster than renumbering every step of a 100,000-pass trace).
    largest = int(np.max(next_step, where=next_step != NEVER, initial=-1))
    renumbered = largest // num_layers * padded_layers + largest % num_layers if largest >= 0 else -1
    last_step = max(num_passes * padded_layers, renumbered + 1)
    return (last_step + 1) * num_experts < np.iinfo(np.int32).max


def _pack_words(events: jax.Array) -> jax.Array:
    """Pack bool [..., P] (P a multiple of 32) into uint32 words [..., P / 32], position i at bit i % 32."""
    num_words = events.shape[-1] // _WORD_BITS
    shifts = jnp.arange(_WORD_BITS, dtype=jnp.uint32)
    bits = events.reshape(events.shape[:-1] + (num_words, _WORD_BITS)).astype(jnp.uint32) << shifts
    return jnp.sum(bits, axis=-1, dtype=jnp.uint32)  # distinct bits, so the sum is their OR


def _clear_lowest_bit(columns: list[jax.Array], active) -> list[jax.Array]:
    """Clear the lowest set bit of multi-word bit rows (word 0 lowest), where `active` is True."""
    bit = jnp.uint32(1)
    done = ~active
    cleared = []
    for word in columns:  # a Python loop over the few words, which avoids a cumulative sum per step
        first_nonzero = ~done & (word != 0)
        cleared.append(jnp.where(first_nonzero, word & (word - bit), word))
        done = done | first_nonzero
    return cleared


def _position_of_rth(events: jax.Array, rank: jax.Array, max_rank: int) -> jax.Array:
    """Return, for each row of `events` bool [..., P] (P a multiple of 32), the position of its rank-th True.

    Rows with fewer than `rank` True entries get P. `rank` is at most the static `max_rank`.
    """
    num_positions = events.shape[-1]
    words = _pack_words(events)
    word_start = jnp.arange(words.shape[-1], dtype=jnp.int32) * _WORD_BITS
    one = jnp.uint32(1)
    if max_rank <= 2 * math.ceil(math.log2(num_positions + 1)):
        # Few requests per step: clear the lowest set bit rank - 1 times, then count its trailing zeros.
        columns = [words[..., index] for index in range(words.shape[-1])]
        for cleared in range(max_rank - 1):
            columns = _clear_lowest_bit(columns, cleared < rank - 1)
        position = jnp.full(columns[0].shape, num_positions, jnp.int32)
        for index in reversed(range(len(columns))):  # the first nonzero word decides
            trailing_zeros = jax.lax.population_count(~columns[index] & (columns[index] - one)).astype(jnp.int32)
            position = jnp.where(columns[index] != 0, index * _WORD_BITS + trailing_zeros, position)
        # The 0-th event is before every position, as in the binary search below.
        return jnp.where(rank > 0, position, 0)

    # Many requests per step: binary search for the smallest prefix (itself included) with `rank` events.
    low = jnp.zeros(events.shape[:-1], jnp.int32)
    high = jnp.full(events.shape[:-1], num_positions, jnp.int32)
    for _ in range(math.ceil(math.log2(num_positions + 1))):
        middle = (low + high) // 2
        kept_bits = jnp.clip(middle[..., None] + 1 - word_start, 0, _WORD_BITS)
        # (1 << 32) overflows uint32, so a full word keeps every bit through a separate branch.
        partial = (one << jnp.minimum(kept_bits, _WORD_BITS - 1).astype(jnp.uint32)) - one
        mask = jnp.where(kept_bits == _WORD_BITS, jnp.uint32(0xFFFFFFFF), partial)
        count = jnp.sum(jax.lax.population_count(words & mask), axis=-1, dtype=jnp.int32)
        enough = count >= rank
        high = jnp.where(enough, middle, high)
        low = jnp.where(enough, low, middle + 1)
    return jnp.minimum(low, num_positions)  # a row with too few events ends one past the last position


def _pool_step(keys, size, experts, next_step, step, capacities, *, num_experts: int, never_base: jax.Array):
    """Advance one pool's stack by one step; return the new keys, size and hits per capacity [C]."""
    num_positions = keys.shape[0]
    position = jnp.arange(num_positions, dtype=jnp.int32)
    used = experts >= 0
    num_requests = jnp.sum(used, dtype=jnp.int32)
    requested = (keys >= step * num_experts) & (keys < (step + 1) * num_experts)
    hits = jnp.sum(requested[None, :] & (position[None, :] < capacities[:, None]), axis=1, dtype=jnp.int32)

    # events[y, i]: position i counts towards moving the item at position y (module docstring).
    shared = (position >= size) | requested
    events = (shared[None, :] | (keys[None, :] > keys[:, None])) & (position[None, :] != position[:, None])
    target = jnp.maximum(position, _position_of_rth(events, num_requests, experts.shape[0]))

    tie = num_experts - 1 - jnp.where(used, experts, 0)
    new_keys = jnp.where(next_step == NEVER, never_base + tie, next_step * num_experts + tie)
    top = jnp.cumsum(used, dtype=jnp.int32) - 1
    stays = (position < size) & ~requested
    moved = jnp.full(num_positions, _EMPTY, jnp.int32)
    moved = moved.at[jnp.where(stays, target, num_positions)].set(keys, mode="drop")
    moved = moved.at[jnp.where(used, top, num_positions)].set(new_keys, mode="drop")
    size = size + num_requests - jnp.sum(requested, dtype=jnp.int32)
    return moved, size, hits


@functools.partial(jax.jit, static_argnames=("num_experts",))
def simulate_belady_stack(capacities: jax.Array, experts: jax.Array, next_step: jax.Array, *, num_experts: int) -> SweepTotals:
    """Belady totals in per-layer scope for every capacity [C] (slots per pool); fields have a leading axis C.

    `experts` and `next_step` are `StepRequests.experts` and `.next_step`, int32 [T, L, R]. Capacities must
    be feasible (`specmd_jax.sim.check_capacity`) and the keys must fit in int32 (`fits_int32`). This
    function checks neither.
    """
    num_passes, num_layers, _ = experts.shape
    num_capacities = capacities.shape[0]
    num_positions = -(-num_experts // _WORD_BITS) * _WORD_BITS
    # Past the last step and past every next request, which may lie beyond the end of a trace prefix.
    finite = jnp.where(next_step == NEVER, -1, next_step)
    never_base = jnp.maximum(num_passes * num_layers, jnp.max(finite) + 1) * num_experts
    steps = jnp.arange(num_passes * num_layers, dtype=jnp.int32).reshape(num_passes, num_layers)
    step_pools = jax.vmap(functools.partial(_pool_step, num_experts=num_experts, never_base=never_base), in_axes=(0, 0, 0, 0, 0, None))

    def body(carry, xs):
        keys, size, hits = carry
        keys, size, step_hits = step_pools(keys, size, *xs, capacities)
        return (keys, size, hits + step_hits), None

    init = (
        jnp.full((num_layers, num_positions), _EMPTY, jnp.int32),
        jnp.zeros(num_layers, jnp.int32),
        jnp.zeros((num_layers, num_capacities), jnp.int32),
    )
    (_, size, hits), _ = jax.lax.scan(body, init, (experts, next_step, steps))

    # The stack contains every expert its layer requested, so its size counts the compulsory misses.
    return per_layer_pool_totals(experts, capacities, hits.T, size)

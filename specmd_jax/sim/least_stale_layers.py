"""Least-Stale in `per-layer` scope by rank counting on bit sets, with no per-capacity gathers.

In per-layer scope a pool has one step per forward pass, so every step starts a pass. All of CURRENT has
then moved to STALE, and every hit is a hit on STALE. All of the step's requests go to the tail of CURRENT,
the hits first and then the misses, each in ascending expert id. The queue order of an item is therefore its
key (last request pass g, missed m, expert id e) at capacity c, where m is whether that request was a
miss at capacity c. Victims are the smallest keys that are not requested now, and the requests take the
largest keys. So the cache of capacity c always contains the min(c, seen) largest keys of all items seen so
far, and a request for x is a hit at capacity c exactly when fewer than c seen items have a larger key:

  rank_c(x) = #{y : g(y) > g(x)} + #{y != x : g(y) = g(x), (m_c(y), y) > (m_c(x), x)}.

The first count does not depend on the capacity: an N x R comparison of last passes per step. The second
runs over the group of x, the items whose last request was at pass g(x). Each pool keeps, as bit sets
over its N items (W = ceil(N / 32) words):
  group[y]   the items whose last request was at the same pass as y's (y included);
  missed[c]  the items whose last request was a miss at capacity c.
For x requested now, with G = group[x] without x and D the items with an id larger than x:
  the group's larger keys are G & missed[c] & D        if x missed at c (its m is 1),
                              G & (missed[c] | D)      if x was a hit at c (its m is 0),
and a popcount gives their number. So a step costs elementwise work on [R, L, W, C] words, instead of
gathering R x R missed flags per capacity. A step requesting the set S updates group[y] to S for y in S
and removes S from every other group[y].

XLA:CPU cost notes (2 cores): the request slot is the leading axis of the step's arrays and the item axis
the leading axis of the state, so every sum adds whole rows, and the capacity axis is last, so the values
of one request stay fixed along the innermost loop. Sums over a middle axis, and gathers of per-capacity
rows, measured several times slower per element. With the capacity axis before the word axis, the step
took 1.5x longer.

Miss classes: a miss of an item never requested before is compulsory, every other miss is a capacity
miss. There are no collision misses in per-layer scope, because a pool has one step per pass and a step
never evicts its own requests. Evictions equal the misses minus the final occupancy min(c, seen).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from specmd_jax.sim.engine import SweepTotals, per_layer_pool_totals

_UNSEEN = -1
_WORD_BITS = 32


def _item_bits(items: jax.Array, num_words: int) -> jax.Array:
    """Return the one-item bit sets uint32 [..., W] of item ids [...]; an id of -1 gives the empty set."""
    word = jnp.arange(num_words, dtype=jnp.int32)
    bit = jnp.uint32(1) << (items & (_WORD_BITS - 1)).astype(jnp.uint32)
    return jnp.where((items >= 0)[..., None] & ((items >> 5)[..., None] == word), bit[..., None], jnp.uint32(0))


def _larger_ids(items: jax.Array, num_words: int) -> jax.Array:
    """Return the bit sets uint32 [..., W] of the ids larger than each of `items` [...] (ids >= 0)."""
    word = jnp.arange(num_words, dtype=jnp.int32)
    # Bits above the item's own bit in its word; a shift of 2 by 31 wraps to 0, which leaves no bits.
    above = ~((jnp.uint32(2) << (items & (_WORD_BITS - 1)).astype(jnp.uint32)) - jnp.uint32(1))
    own_word = (items >> 5)[..., None]
    return jnp.where(word > own_word, jnp.uint32(0xFFFFFFFF), jnp.where(word == own_word, above[..., None], jnp.uint32(0)))


def _count(bit_sets: jax.Array) -> jax.Array:
    """Return the number of items in bit sets uint32 [..., W], as int32 [...]."""
    return jnp.sum(jax.lax.population_count(bit_sets).astype(jnp.int32), axis=-1)


def _pass_step(state, positions, step, capacities):
    """Advance every layer's pool at every capacity by one pass.

    Args:
      state: (last_pass int32 [N, L], -1 if never requested; group uint32 [N, L, W]; missed uint32 [L, W, C]).
      positions: int32 [R, L], this pass's requests of each layer, ascending, -1 padded.
    Returns the new state and the hits [L, C] of this pass.
    """
    last_pass, group, missed = state
    num_items, num_layers, num_words = group.shape
    layer = jnp.arange(num_layers, dtype=jnp.int32)[None, :]
    used = positions >= 0
    item = jnp.where(used, positions, 0)
    last = jnp.where(used, last_pass[item, layer], _UNSEEN)  # [R, L]
    seen = used & (last != _UNSEEN)
    newer = jnp.sum(last_pass[:, None, :] > last[None, :, :], axis=0, dtype=jnp.int32)  # [R, L]

    own = _item_bits(jnp.where(used, positions, -1), num_words)  # [R, L, W]
    others = group[item, layer] & ~own
    larger_ids = _larger_ids(item, num_words)
    shift = (item & (_WORD_BITS - 1)).astype(jnp.uint32)[..., None]
    # Per word w, [R, L, C] arrays. The capacity axis is last, so values of a request stay fixed along
    # the innermost loop.
    item_missed = jnp.zeros(missed.shape[-1:], bool)
    for word in range(num_words):
        in_word = (own[:, :, word] != 0)[..., None]
        item_missed = item_missed | (in_word & (((missed[None, :, word, :] >> shift) & 1) != 0))
    count = jnp.zeros(item_missed.shape, jnp.int32)
    for word in range(num_words):
        other = others[:, :, word, None]
        larger_id = larger_ids[:, :, word, None]
        missed_word = missed[None, :, word, :]
        larger = jnp.where(item_missed, other & missed_word & larger_id, other & (missed_word | larger_id))
        count = count + jax.lax.population_count(larger).astype(jnp.int32)
    hit = seen[..., None] & (newer[..., None] + count < capacities)  # [R, L, C]
    miss = used[..., None] & ~hit

    # The request set S of each layer; distinct items own distinct bits, so the sums are ORs.
    requested = jnp.sum(own, axis=0, dtype=jnp.uint32)  # [L, W]
    in_requested = _count(_item_bits(jnp.arange(num_items, dtype=jnp.int32), num_words)[:, None, :] & requested[None]) > 0
    group = jnp.where(in_requested[..., None], requested[None], group & ~requested[None])
    missed_now = jnp.stack(
        [jnp.sum(jnp.where(miss, own[:, :, word, None], jnp.uint32(0)), axis=0, dtype=jnp.uint32) for word in range(num_words)],
        axis=1,
    )  # [L, W, C]
    missed = (missed & ~requested[..., None]) | missed_now
    last_pass = last_pass.at[jnp.where(used, positions, num_items), layer].set(step, mode="drop")
    return (last_pass, group, missed), jnp.sum(hit, axis=0, dtype=jnp.int32)


def least_stale_hits(capacities: jax.Array, experts: jax.Array, *, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Return Least-Stale's hits int32 [C, L] and the items each layer requested int32 [L], in per-layer scope.

    `experts` is `StepRequests.experts`, int32 [T, L, R]; the layers' pools are independent.
    """
    num_passes, num_layers, _ = experts.shape
    num_capacities = capacities.shape[0]
    num_words = -(-num_experts // _WORD_BITS)

    def body(carry, xs):
        state, hits = carry
        pass_experts, step = xs
        state, step_hits = _pass_step(state, pass_experts.T, step, capacities)
        return (state, hits + step_hits), None

    init = (
        (
            jnp.full((num_experts, num_layers), _UNSEEN, jnp.int32),
            jnp.zeros((num_experts, num_layers, num_words), jnp.uint32),
            jnp.zeros((num_layers, num_words, num_capacities), jnp.uint32),
        ),
        jnp.zeros((num_layers, num_capacities), jnp.int32),
    )
    passes = jnp.arange(num_passes, dtype=jnp.int32)
    ((last_pass, _, _), hits), _ = jax.lax.scan(body, init, (experts, passes))
    return hits.T, jnp.sum(last_pass != _UNSEEN, axis=0, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=("num_experts",))
def simulate_least_stale_per_layer(capacities: jax.Array, experts: jax.Array, *, num_experts: int) -> SweepTotals:
    """Least-Stale totals in per-layer scope for every capacity [C] (slots per pool); fields have a leading axis C.

    `experts` is `StepRequests.experts`, int32 [T, L, R]. Capacities must be feasible, as
    `specmd_jax.sim.check_capacity` checks; this function does not check them.
    """
    hits, seen = least_stale_hits(capacities, experts, num_experts=num_experts)
    return per_layer_pool_totals(experts, capacities, hits, seen)

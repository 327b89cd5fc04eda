"""Least-Stale in `per-layer` scope by rank counting: O(R * R) work per capacity and step.

In per-layer scope a pool has one step per forward pass, so every step starts a pass. All of CURRENT has
then moved to STALE, and every hit is a hit on STALE. All of the step's requests go to the tail of CURRENT,
the hits first and then the misses, each in ascending expert id. The queue order of an item is therefore its
key (last request pass g, missed m, expert id e) at capacity c, where m is whether that request was a
miss at capacity c. Victims are the smallest keys that are not requested now, and the requests take the
largest keys. So the cache of capacity c always contains the min(c, seen) largest keys of all items seen so
far, and a request for x is a hit at capacity c exactly when fewer than c seen items have a larger key:

  rank_c(x) = #{y : g(y) > g(x)} + #{y != x : g(y) = g(x), (m_c(y), y) > (m_c(x), x)} < c.

The first count does not depend on the capacity. The second runs over the items whose last request was
at pass g(x): at most R of them, found in the trace's requests of that pass. So a step costs an N x R count
shared by all capacities, and an R x R count per capacity, instead of the generic scan's queue update over
all N items per capacity.

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


def _layer_step(last_pass, missed, layer_requests, experts, step, capacities):
    """Advance one layer's pool at every capacity by one pass.

    Args:
      last_pass: int32 [N], pass of each item's last request, -1 if never requested.
      missed: bool [N, C], whether that request was a miss at each capacity.
      layer_requests: int32 [T, R], this layer's requests of every pass (`StepRequests.experts[:, l]`).
      experts: int32 [R], this pass's requests, ascending, -1 padded.
    Returns the new last_pass and missed, and the hits [C] of this step.
    """
    num_items = last_pass.shape[0]
    used = experts >= 0
    item = jnp.where(used, experts, 0)
    group = last_pass[item]  # [R]
    seen = used & (group != _UNSEEN)
    newer = jnp.sum(last_pass[:, None] > group[None, :], axis=0, dtype=jnp.int32)

    # Items last requested in the same pass as x_j: that pass's requests whose last pass is still it.
    others = layer_requests[jnp.maximum(group, 0)]  # [R (j), R (k)]
    other = jnp.where(others >= 0, others, 0)
    same_group = (others >= 0) & (other != item[:, None]) & (last_pass[other] == group[:, None]) & seen[:, None]
    other_missed = missed[other]  # [R, R, C]
    item_missed = missed[item][:, None, :]  # [R, 1, C]
    larger = (other_missed & ~item_missed) | ((other_missed == item_missed) & (other > item[:, None])[..., None])
    rank = newer[:, None] + jnp.sum(same_group[..., None] & larger, axis=1, dtype=jnp.int32)  # [R, C]
    hit = seen[:, None] & (rank < capacities[None, :])

    target = jnp.where(used, item, num_items)
    last_pass = last_pass.at[target].set(step, mode="drop")
    missed = missed.at[target].set(~hit, mode="drop")
    return last_pass, missed, jnp.sum(hit, axis=0, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=("num_experts",))
def simulate_least_stale_per_layer(capacities: jax.Array, experts: jax.Array, *, num_experts: int) -> SweepTotals:
    """Least-Stale totals in per-layer scope for every capacity [C] (slots per pool); fields have a leading axis C.

    `experts` is `StepRequests.experts`, int32 [T, L, R]. Capacities must be feasible, as
    `specmd_jax.sim.check_capacity` checks; this function does not check them.
    """
    num_passes, num_layers, _ = experts.shape
    num_capacities = capacities.shape[0]
    by_layer = jnp.transpose(experts, (1, 0, 2))  # [L, T, R]
    step_layers = jax.vmap(_layer_step, in_axes=(0, 0, 0, 0, None, None))

    def body(carry, xs):
        last_pass, missed, hits = carry
        pass_experts, step = xs
        last_pass, missed, step_hits = step_layers(last_pass, missed, by_layer, pass_experts, step, capacities)
        return (last_pass, missed, hits + step_hits), None

    init = (
        jnp.full((num_layers, num_experts), _UNSEEN, jnp.int32),
        jnp.zeros((num_layers, num_experts, num_capacities), bool),
        jnp.zeros((num_layers, num_capacities), jnp.int32),
    )
    passes = jnp.arange(num_passes, dtype=jnp.int32)
    (last_pass, _, hits), _ = jax.lax.scan(body, init, (experts, passes))

    seen = jnp.sum(last_pass != _UNSEEN, axis=1, dtype=jnp.int32)
    return per_layer_pool_totals(experts, capacities, hits.T, seen)

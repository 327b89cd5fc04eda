"""The expert cache manager: policy decisions from the simulator, transfers and slot bookkeeping.

Decisions come from `specmd_jax.sim.engine.pool_step`, the simulator's own step function. It runs on
one pool of L x E items (`global` scope, flat id `layer * E + expert`, step `pass * L + layer`), so a
run and a simulation of its recorded trace agree hit for hit and victim for victim (docs/semantics.md).
The manager turns each decision into slot-table changes and `jax.device_put` transfers:

1. The demand phase of step s: `pool_step` on the distinct experts the pass selected at this layer.
   Victims leave their slots; each miss takes a free slot and is loaded (a demand transfer).
2. The prefetch phase, when a prefetcher is set: it returns the pool after its own phase, the items
   to prefetch and their victims. Prefetches are issued at once, behind the demand loads, so they
   overlap the wait and the compute of this layer and the next ones.
3. The wait: the layer blocks only on transfers of the items it requested that have not arrived;
   they are then written into their slots.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from specmd_jax.policies.base import NEVER, EvictionPolicy
from specmd_jax.policies.registry import get_policy
from specmd_jax.runtime.experts import HostExperts, SlotCache
from specmd_jax.runtime.link import Link, Transfer
from specmd_jax.sim.engine import OUTCOME_HIT, OUTCOME_NONE, PoolState, init_pool, pool_step
from specmd_jax.sim.sweep import CapacityError
from specmd_jax.timing.timeline import TRANSFER_PREFETCH


@dataclasses.dataclass(frozen=True, eq=False)
class StepRecord:
    """Record of the manager's decisions and wait at one step.

    Attributes:
      step, pass_index, layer: the step s = pass_index * L + layer.
      requests: int32 [n], flat ids of the distinct experts requested, ascending.
      outcomes: int8 [n], the simulator's OUTCOME_* of each request.
      victims: int32, flat ids evicted by the demand phase, ascending.
      prefetched: int32, flat ids prefetched in the prefetch phase, in issue order.
      prefetch_victims: int32, flat ids evicted by the prefetch phase, ascending.
      stall: seconds the layer waited for transfers.
      transfer_overhead: host seconds spent issuing this step's transfers and writing slots, outside the wait.
    """

    step: int
    pass_index: int
    layer: int
    requests: np.ndarray
    outcomes: np.ndarray
    victims: np.ndarray
    prefetched: np.ndarray
    prefetch_victims: np.ndarray
    stall: float
    transfer_overhead: float

    @property
    def hits(self) -> int:
        return int(np.count_nonzero(self.outcomes == OUTCOME_HIT))


class PrefetchContext(NamedTuple):
    """Input of a prefetcher, taken after the demand phase of a step.

    Attributes:
      step, pass_index, layer: the step.
      pool: the pool state after the demand phase.
      requested: int32, flat ids requested by this step, ascending.
      demand_victims: int32, flat ids the demand phase evicted.
      hidden: [B, S, H] the router input of this layer, or None.
      speculative_logits: float32 [B * S, E], the next MoE layer's router on `hidden`, or None (the
        last MoE layer, or a run that does not compute them).
      capacity: slots of the pool.
    """

    step: int
    pass_index: int
    layer: int
    pool: PoolState
    requested: np.ndarray
    demand_victims: np.ndarray
    hidden: jax.Array | None
    speculative_logits: np.ndarray | None
    capacity: int


class PrefetchDecision(NamedTuple):
    """A prefetcher's output: the pool after its phase, the flat ids to load (in issue order) and its victims."""

    pool: PoolState
    prefetch: np.ndarray
    victims: np.ndarray


Prefetcher = Callable[[PrefetchContext], PrefetchDecision | None]
"""A prefetch phase plugged in after each step's demand phase; None prefetches nothing."""


@functools.partial(jax.jit, static_argnames=("policy", "num_steps"))
def _demand_step(policy, params, state, positions, next_steps, step, pass_index, capacity, base_key, num_steps):
    # The per-step key is derived as in the simulator's scan, so the random policy draws the same values.
    rng = jax.random.fold_in(base_key, step)
    return pool_step(policy, params, state, positions, next_steps, step, pass_index, capacity, rng, num_steps)


def resolve_policy(policy: str | EvictionPolicy, params: Any = None) -> tuple[EvictionPolicy, Any]:
    """Look up `policy` and check `params` (default: the policy's defaults)."""
    policy = get_policy(policy) if isinstance(policy, str) else policy
    params = policy.default_params() if params is None else params
    if policy.check_params is not None:
        policy.check_params(params)
    return policy, params


class ExpertCacheManager:
    """Decide and carry out the expert cache's hits, misses, evictions and prefetches, step by step.

    Args:
      host: the expert weights in host memory.
      policy: a registered eviction policy name, or an `EvictionPolicy`.
      capacity: cache slots (the `global` pool of all L x E items).
      link: the link that moves experts to the cache's device.
      num_steps: steps of the whole run (passes x L); the policies take it as a static bound.
      knows_next_use: whether the caller passes each request's next request step (a replayed trace).
        Belady needs it, so it is rejected without.
      seed: seed of the per-step random keys (the random policy).
      params: the policy's hyper-parameters, default its defaults.
      prefetcher: the prefetch phase after each demand phase, or None.
      decision_device: where the pool state and the policy run; the first CPU device by default, so
        the decisions never occupy the accelerator.
    """

    def __init__(
        self,
        host: HostExperts,
        *,
        policy: str | EvictionPolicy,
        capacity: int,
        link: Link,
        num_steps: int,
        knows_next_use: bool = False,
        seed: int = 0,
        params: Any = None,
        prefetcher: Prefetcher | None = None,
        decision_device: jax.Device | None = None,
    ):
        self.policy, self.params = resolve_policy(policy, params)
        if self.policy.name == "belady" and not knows_next_use:
            raise ValueError(
                "policy 'belady' needs the step of each expert's next request, which a live run does not know; "
                "replay a recorded trace (replay=trace, or --replay on the command line) or choose another policy"
            )
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
            raise ValueError(f"num_steps: expected a positive integer, got {num_steps!r}")
        self.host = host
        self.cache = SlotCache(host, capacity, link.device)
        self.link = link
        self.num_steps = int(num_steps)
        self.prefetcher = prefetcher
        self.decision_device = decision_device or jax.devices("cpu")[0]
        self.pool = jax.device_put(init_pool(self.policy, host.num_items, self.params), self.decision_device)
        self.base_key = jax.device_put(jax.random.PRNGKey(seed), self.decision_device)
        self.pending: dict[int, Transfer] = {}  # items that own a slot whose weights have not been written yet
        self.unused_prefetches: dict[int, Transfer] = {}  # prefetched items not requested since
        self.records: list[StepRecord] = []

    @property
    def capacity(self) -> int:
        return self.cache.num_slots

    @property
    def num_layers(self) -> int:
        return self.host.num_layers

    @property
    def num_experts(self) -> int:
        return self.host.num_experts

    def handle_step(
        self,
        pass_index: int,
        layer: int,
        expert_ids: np.ndarray,
        *,
        next_steps: np.ndarray | None = None,
        hidden: jax.Array | None = None,
        speculative_logits: np.ndarray | None = None,
    ) -> np.ndarray:
        """Make every expert selected at (pass_index, MoE layer `layer`) resident and written; return the layer's slot table.

        Args:
          expert_ids: int [..., K], the experts selected by each token of the pass at this layer.
          next_steps: int32 [n], the step of each requested expert's next request (requests in
            ascending expert id), when known; NEVER otherwise.
          hidden, speculative_logits: passed on to the prefetcher (see `PrefetchContext`).
        Returns int32 [E], the slot of each expert of this layer (-1 for experts not resident).
        """
        step = pass_index * self.num_layers + layer
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step {step} (pass {pass_index}, layer {layer}): expected a step in [0, {self.num_steps})")
        experts = np.unique(np.asarray(expert_ids).reshape(-1))
        experts = experts[experts >= 0]
        if experts.size and experts[-1] >= self.num_experts:
            raise ValueError(f"expert id {experts[-1]} at layer {layer}: expected ids in [0, {self.num_experts})")
        requests = (experts + layer * self.num_experts).astype(np.int32)
        if requests.size > self.capacity:
            raise CapacityError(
                f"a capacity of {self.capacity} slots is smaller than the {requests.size} distinct experts requested "
                f"at pass {pass_index}, layer {layer}; use at least {requests.size} slots, or a shorter prefill chunk"
            )

        victims, outcomes = self._demand_phase(step, pass_index, requests, next_steps, np.asarray(expert_ids).size)
        misses = requests[(outcomes != OUTCOME_HIT) & (outcomes != OUTCOME_NONE)]
        hits = requests[outcomes == OUTCOME_HIT]
        for flat_id in victims:
            self._evict(int(flat_id))
        for flat_id in hits:
            self._use(int(flat_id), step)
        loads = [(int(f), self.cache.assign(int(f)), self.host.expert(int(f))) for f in misses]
        waiting = [self.pending[int(f)] for f in hits if int(f) in self.pending]
        overhead_began = self.link.clock()
        for transfer in self.link.issue_demand(step, loads, waiting):
            transfer.consumer_step = step
            self.pending[transfer.flat_id] = transfer
        overhead = self.link.clock() - overhead_began

        prefetched, prefetch_victims = np.zeros(0, np.int32), np.zeros(0, np.int32)
        if self.prefetcher is not None:
            context = PrefetchContext(
                step, pass_index, layer, self.pool, requests, victims, hidden, speculative_logits, self.capacity
            )
            decision = self.prefetcher(context)
            if decision is not None:
                overhead_began = self.link.clock()
                prefetched, prefetch_victims = self._prefetch_phase(step, requests, decision)
                overhead += self.link.clock() - overhead_began
        self._check_residency(step)

        needed = [self.pending.pop(int(f)) for f in requests if int(f) in self.pending]
        stall = self.link.wait(needed)
        overhead_began = self.link.clock()
        for transfer in needed:
            self.cache.write(transfer.slot, transfer.arrays)
        overhead += self.link.clock() - overhead_began
        self.records.append(
            StepRecord(step, pass_index, layer, requests, outcomes, victims, prefetched, prefetch_victims, stall, overhead)
        )
        return self.cache.table_row(layer)

    def _demand_phase(self, step, pass_index, requests, next_steps, num_selections) -> tuple[np.ndarray, np.ndarray]:
        """Run `pool_step` on the requests; return the victims (flat ids, ascending) and the outcome of each request."""
        # R request slots: enough for the pass's selections, at most one layer's experts. The decisions
        # do not depend on R, so a decode pass compiles a smaller step than a prefill.
        max_requests = max(1, min(self.num_experts, num_selections))
        positions = np.full(max_requests, -1, np.int32)
        positions[:requests.size] = requests
        following = np.full(max_requests, -1, np.int32)
        if next_steps is None:
            following[:requests.size] = NEVER
        else:
            next_steps = np.asarray(next_steps)
            if next_steps.shape != requests.shape:
                raise ValueError(f"next_steps: expected one entry per request, shape {requests.shape}, got {next_steps.shape}")
            following[:requests.size] = next_steps
        self.pool, _, events = _demand_step(
            self.policy, self.params, self.pool, positions, following, np.int32(step), np.int32(pass_index),
            np.int32(self.capacity), self.base_key, num_steps=self.num_steps,
        )
        outcomes, victim_ids = jax.device_get((events.outcomes, events.victims))
        return victim_ids[victim_ids >= 0].astype(np.int32), outcomes[:requests.size].astype(np.int8)

    def _prefetch_phase(self, step: int, requests: np.ndarray, decision: PrefetchDecision) -> tuple[np.ndarray, np.ndarray]:
        """Check a prefetcher's decision, evict its victims and issue its prefetches."""
        prefetch = np.asarray(decision.prefetch, np.int32).reshape(-1)
        victims = np.sort(np.asarray(decision.victims, np.int32).reshape(-1))
        resident = self.cache.slot_of >= 0
        problems = []
        if np.unique(prefetch).size != prefetch.size:
            problems.append(f"repeated prefetches {prefetch.tolist()}")
        if np.unique(victims).size != victims.size:
            problems.append(f"repeated victims {victims.tolist()}")
        if ((prefetch < 0) | (prefetch >= self.host.num_items)).any() or ((victims < 0) | (victims >= self.host.num_items)).any():
            problems.append(f"flat ids outside [0, {self.host.num_items})")
        elif resident[prefetch].any():
            problems.append(f"prefetches of resident items {prefetch[resident[prefetch]].tolist()}")
        elif not resident[victims].all():
            problems.append(f"victims that are not resident {victims[~resident[victims]].tolist()}")
        if np.isin(victims, requests).any():
            problems.append(f"victims requested in this step {victims[np.isin(victims, requests)].tolist()}")
        if self.cache.occupancy - victims.size + prefetch.size > self.capacity:
            problems.append(f"{prefetch.size} prefetches and {victims.size} victims overfill {self.capacity} slots")
        if problems:
            raise ValueError(f"prefetcher output at step {step} is invalid: {'; '.join(problems)}")

        for flat_id in victims:
            self._evict(int(flat_id))
        loads = [(int(f), self.cache.assign(int(f)), self.host.expert(int(f))) for f in prefetch]
        for transfer in self.link.issue_prefetches(step, loads):
            self.pending[transfer.flat_id] = transfer
            self.unused_prefetches[transfer.flat_id] = transfer
        self.pool = decision.pool
        return prefetch, victims

    def _use(self, flat_id: int, step: int) -> None:
        """Count a request of a resident item; the first request after a prefetch consumes it."""
        if self.cache.slot_of[flat_id] < 0:
            raise RuntimeError(f"the policy reports item {flat_id} as a hit at step {step}, but it owns no slot")
        transfer = self.unused_prefetches.pop(flat_id, None)
        if transfer is not None:
            transfer.consumer_step = step

    def _evict(self, flat_id: int) -> None:
        # A transfer still pending for the victim is dropped: its slot gets another item's weights.
        self.cache.release(flat_id)
        self.pending.pop(flat_id, None)
        self.unused_prefetches.pop(flat_id, None)

    def _check_residency(self, step: int) -> None:
        """Raise `RuntimeError` unless the pool's resident items are exactly the items that own a slot."""
        in_pool = np.asarray(jax.device_get(self.pool.resident))
        in_slots = self.cache.slot_of >= 0
        if not np.array_equal(in_pool, in_slots):
            only_pool = np.flatnonzero(in_pool & ~in_slots).tolist()
            only_slots = np.flatnonzero(in_slots & ~in_pool).tolist()
            raise RuntimeError(
                f"step {step}: the pool and the slot table disagree: resident only in the pool {only_pool}, "
                f"only in the slot table {only_slots}"
            )

    def finish(self) -> None:
        """Close the run: give queued prefetches their link time."""
        self.link.finish()

    def prefetch_transfers(self) -> list[Transfer]:
        return [t for t in self.link.log if t.kind == TRANSFER_PREFETCH]

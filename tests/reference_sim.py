"""A slow, plain-Python cache simulator written only from docs/semantics.md.

It is the oracle for the jitted simulator in `specmd_jax.sim`. Every policy keeps its state in explicit
Python structures (dicts, sets, lists used as queues) that mirror the wording of the contract, and every
step is processed one request at a time. Nothing here is imported from `specmd_jax.sim` or
`specmd_jax.policies` except `CapacityError`, so a shared bug cannot hide in shared code.

Two deliberate differences from the jitted simulator's structure:
  * By default (order="interleaved") misses are processed one at a time in ascending expert id, and
    before each insertion into a full pool the policy evicts one victim. The contract claims that this
    equals choosing all m victims first (step 3, then step 4). order="victims-first" does exactly that,
    still one eviction at a time, and the parity tests compare both orders with the simulator.
  * Keys are the contract's literal keys (e.g. LRU's (step of last use, flat id)), not sequence numbers.

The only JAX calls make the Random policy's draws, because the contract defines them as
`jax.random.randint(jax.random.fold_in(jax.random.PRNGKey(seed), s), (N,), 0, 2**31 - 1, dtype=int32)`.

Readings of the contract where its text leaves room (the parity tests check them against the simulator):
  * A step without requests changes no cache contents, but Least-Stale's start-of-pass move
    (CURRENT to the tail of STALE) still happens at the first step of each pass, because the contract
    ties that move to the pass, not to requests.
  * SIEVE: after evicting the newest item the hand wraps to the oldest item.
  * S3-FIFO: "S holds at least small_fraction x capacity items" counts every item in S, including the
    items requested in this step, and compares exactly with the decimal value of small_fraction (0.1 x 30
    is 3, not 3.0000000000000004). If the queue that this rule selects has no item that is not
    requested in this step, the oldest unrequested item of the other queue is taken. The parenthetical
    "if M then exceeds its share the loop goes on" adds nothing, because the loop goes on until a victim
    is found in any case. round() in the ghost limit rounds halves up, like the contract's rule for
    fractional capacities.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import math
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from specmd_jax.sim.sweep import CapacityError

OUTCOME_NONE = 0
OUTCOME_HIT = 1
OUTCOME_COMPULSORY = 2
OUTCOME_CAPACITY = 3
OUTCOME_COLLISION = 4

SCOPES = ("global", "per-layer")
ORDERS = ("interleaved", "victims-first")
POLICIES = ("lru", "fifo", "lfu", "random", "belady", "least-stale", "sieve", "s3fifo")

S3FIFO_DEFAULTS = {"small_fraction": 0.1, "promote_threshold": 1}
S3FIFO_MAX_FREQUENCY = 3
RANDOM_DRAW_MAX = 2**31 - 1


@dataclasses.dataclass
class ReferenceResult:
    """Totals and per-step events of one configuration, in the layout of `run_sweep`.

    outcomes: int8 [T, L, R], OUTCOME_* per request slot (slots in ascending expert id).
    victims: int32 [T, L, R], flat ids of the step's victims in ascending order, -1 padded.
    occupancy: int32 [T, L], items resident in the pool of layer l after step (p, l) (for `global`
      scope the one shared pool).
    """

    requests: int
    hits: int
    compulsory: int
    capacity: int
    collision: int
    evictions: int
    requests_per_layer: np.ndarray
    hits_per_layer: np.ndarray
    outcomes: np.ndarray
    victims: np.ndarray
    occupancy: np.ndarray

    @property
    def misses(self) -> int:
        return self.requests - self.hits


def step_requests(trace) -> list[list[list[int]]]:
    """Return requests[p][l]: the distinct experts requested by pass p at layer l, ascending."""
    requests = []
    for p in range(trace.num_passes):
        first, stop = int(trace.pass_offsets[p]), int(trace.pass_offsets[p + 1])
        per_layer = []
        for layer in range(trace.num_layers):
            experts = set()
            for token in range(first, stop):
                if trace.missing[token, layer]:
                    continue
                experts.update(int(e) for e in trace.expert_ids[token, layer])
            per_layer.append(sorted(experts))
        requests.append(per_layer)
    return requests


def random_draws(seed: int, step: int, pool_size: int) -> list[int]:
    """Return the Random policy's draws of one step: one int32 per item position of the pool."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    draws = jax.random.randint(key, (pool_size,), 0, RANDOM_DRAW_MAX, dtype=jnp.int32)
    return np.asarray(draws).tolist()


@functools.lru_cache(maxsize=8)
def random_draw_table(seed: int, num_steps: int, pool_size: int, phase: int = 0) -> np.ndarray:
    """Return int32 [num_steps, pool_size] whose row s is `random_draws(seed, s, pool_size)`.

    With phase 1, the draws of the prefetch phase instead: the key of step s folded with 1.

    One vmapped call replaces thousands of eager calls of a few hundred microseconds each. Threefry
    draws do not depend on batching, and a parity test compares rows with `random_draws`.
    """

    def draws_of_step(step):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
        if phase:
            key = jax.random.fold_in(key, phase)
        return jax.random.randint(key, (pool_size,), 0, RANDOM_DRAW_MAX, dtype=jnp.int32)

    return np.asarray(jax.vmap(draws_of_step)(jnp.arange(num_steps, dtype=jnp.int32)))


# ---------------------------------------------------------------------------------------------------
# Policies. Each one stores only its own ranking state, and the pool owns residency.
#   begin_pass(p)                       a new forward pass starts for this pool
#   on_hit(item, step)                  step 2, called in ascending expert id
#   evict_one(requested, step) -> item  remove one resident item not in `requested` and return it
#   on_insert(item, step)               step 4, called in ascending expert id
# ---------------------------------------------------------------------------------------------------


class LruPolicy:
    phase = 0  # 0 demand, 1 prefetch; a step's prefetch insertions are later uses than its demand ones

    def __init__(self, context):
        self.last_use: dict[int, tuple[int, int]] = {}

    def begin_pass(self, pass_index):
        pass

    def on_hit(self, item, step):
        self.last_use[item] = (step, self.phase)

    def on_insert(self, item, step):
        self.last_use[item] = (step, self.phase)

    def evict_one(self, requested, step):
        candidates = [(last, item) for item, last in self.last_use.items() if item not in requested]
        _, victim = min(candidates)
        del self.last_use[victim]
        return victim


class FifoPolicy:
    phase = 0

    def __init__(self, context):
        self.inserted_at: dict[int, tuple[int, int]] = {}

    def begin_pass(self, pass_index):
        pass

    def on_hit(self, item, step):
        pass

    def on_insert(self, item, step):
        self.inserted_at[item] = (step, self.phase)

    def evict_one(self, requested, step):
        candidates = [(inserted, item) for item, inserted in self.inserted_at.items() if item not in requested]
        _, victim = min(candidates)
        del self.inserted_at[victim]
        return victim


class LfuPolicy:
    """Requests since insertion (the inserting request counts as the first), forgotten on eviction."""

    phase = 0

    def __init__(self, context):
        self.count: dict[int, int] = {}
        self.last_use: dict[int, tuple[int, int]] = {}

    def begin_pass(self, pass_index):
        pass

    def on_hit(self, item, step):
        self.count[item] += 1
        self.last_use[item] = (step, self.phase)

    def on_insert(self, item, step):
        self.count[item] = 1
        self.last_use[item] = (step, self.phase)

    def evict_one(self, requested, step):
        candidates = [(self.count[item], self.last_use[item], item) for item in self.count if item not in requested]
        _, _, victim = min(candidates)
        del self.count[victim]
        del self.last_use[victim]
        return victim


class RandomPolicy:
    phase = 0

    def __init__(self, context):
        self.draw_table = random_draw_table(context["seed"], context["num_steps"], context["pool_size"])
        self.prefetch_draw_table = random_draw_table(context["seed"], context["num_steps"], context["pool_size"], 1)
        self.position_of = context["position_of"]
        self.resident: set[int] = set()

    def begin_pass(self, pass_index):
        pass

    def on_hit(self, item, step):
        pass

    def on_insert(self, item, step):
        self.resident.add(item)

    def evict_one(self, requested, step):
        draws = (self.prefetch_draw_table if self.phase else self.draw_table)[step]
        candidates = [(int(draws[self.position_of(item)]), item) for item in self.resident if item not in requested]
        _, victim = min(candidates)
        self.resident.remove(victim)
        return victim


class BeladyPolicy:
    """Evict the item whose next request is furthest away (never again counts as infinitely far)."""

    def __init__(self, context):
        self.request_steps: dict[int, list[int]] = context["request_steps"]
        self.next_use: dict[int, float] = {}

    def begin_pass(self, pass_index):
        pass

    def _remember_next_use(self, item, step):
        steps = self.request_steps[item]
        later = bisect.bisect_right(steps, step)
        self.next_use[item] = steps[later] if later < len(steps) else math.inf

    def on_hit(self, item, step):
        self._remember_next_use(item, step)

    def on_insert(self, item, step):
        self._remember_next_use(item, step)

    def evict_one(self, requested, step):
        furthest = max(self.next_use[item] for item in self.next_use if item not in requested)
        victim = min(item for item, when in self.next_use.items() if when == furthest and item not in requested)
        del self.next_use[victim]
        return victim


class LeastStalePolicy:
    """Two literal FIFO queues, CURRENT and STALE, each with its head at index 0."""

    def __init__(self, context):
        self.current: list[int] = []
        self.stale: list[int] = []

    def begin_pass(self, pass_index):
        self.stale.extend(self.current)
        self.current = []

    def on_hit(self, item, step):
        if item in self.stale:
            self.stale.remove(item)
            self.current.append(item)

    def on_insert(self, item, step):
        self.current.append(item)

    def evict_one(self, requested, step):
        for queue in (self.stale, self.current):
            for item in queue:
                if item not in requested:
                    queue.remove(item)
                    return item
        raise AssertionError("least-stale: no resident item outside the step's requests")


class SievePolicy:
    """One queue, oldest first, a visited bit per item and a hand (None means the oldest item)."""

    def __init__(self, context):
        self.queue: list[int] = []
        self.visited: dict[int, bool] = {}
        self.hand: int | None = None

    def begin_pass(self, pass_index):
        pass

    def on_hit(self, item, step):
        self.visited[item] = True

    def on_insert(self, item, step):
        self.queue.append(item)
        self.visited[item] = False

    def evict_one(self, requested, step):
        position = 0 if self.hand is None else self.queue.index(self.hand)
        # Terminates: the first lap clears every unrequested bit, and the pool has an unrequested item.
        while True:
            item = self.queue[position]
            if item in requested:
                position = (position + 1) % len(self.queue)
            elif self.visited[item]:
                self.visited[item] = False
                position = (position + 1) % len(self.queue)
            else:
                break
        newer = position + 1
        self.hand = self.queue[newer] if newer < len(self.queue) else None
        del self.queue[position]
        del self.visited[item]
        return item


def _round_half_up(value: Fraction) -> int:
    return math.floor(value + Fraction(1, 2))


class S3FifoPolicy:
    """Literal small (S), main (M) and ghost (G) FIFO queues, oldest first."""

    def __init__(self, context):
        params = context["params"]
        self.capacity = context["capacity"]
        # The decimal value the user wrote, so that 0.1 x 30 compares as exactly 3.
        self.small_fraction = Fraction(str(params["small_fraction"]))
        self.promote_threshold = params["promote_threshold"]
        self.small_target = self.small_fraction * self.capacity
        self.ghost_limit = self.capacity - _round_half_up(self.small_target)
        self.small: list[int] = []
        self.main: list[int] = []
        self.ghost: list[int] = []
        self.frequency: dict[int, int] = {}

    def begin_pass(self, pass_index):
        pass

    def on_hit(self, item, step):
        self.frequency[item] = min(self.frequency[item] + 1, S3FIFO_MAX_FREQUENCY)

    def on_insert(self, item, step):
        if item in self.ghost:
            self.ghost.remove(item)
            self.main.append(item)
        else:
            self.small.append(item)
        self.frequency[item] = 0

    def _remember_ghost(self, item):
        self.ghost.append(item)
        while len(self.ghost) > self.ghost_limit:
            self.ghost.pop(0)

    @staticmethod
    def _oldest_unrequested(queue, requested):
        for item in queue:
            if item not in requested:
                return item
        return None

    def evict_one(self, requested, step):
        while True:
            small_item = self._oldest_unrequested(self.small, requested)
            main_item = self._oldest_unrequested(self.main, requested)
            use_small = len(self.small) >= self.small_target or not self.main
            if (use_small and small_item is not None) or main_item is None:
                item = small_item
                self.small.remove(item)
                if self.frequency[item] >= self.promote_threshold:
                    self.main.append(item)
                    self.frequency[item] = 0
                    continue
                del self.frequency[item]
                self._remember_ghost(item)
                return item
            item = main_item
            self.main.remove(item)
            if self.frequency[item] > 0:
                self.main.append(item)
                self.frequency[item] -= 1
                continue
            del self.frequency[item]
            return item


POLICY_CLASSES = {
    "lru": LruPolicy,
    "fifo": FifoPolicy,
    "lfu": LfuPolicy,
    "random": RandomPolicy,
    "belady": BeladyPolicy,
    "least-stale": LeastStalePolicy,
    "sieve": SievePolicy,
    "s3fifo": S3FifoPolicy,
}


class Pool:
    """One cache pool: residency, miss-class history and the policy's state."""

    def __init__(self, policy, capacity: int, order: str):
        self.policy = policy
        self.capacity = capacity
        self.order = order
        self.resident: set[int] = set()
        self.seen: set[int] = set()
        self.evicted_in_pass: dict[int, int] = {}
        self.current_pass: int | None = None

    def run_step(
        self, pass_index: int, step: int, requested: list[int], insert_misses: bool = True, used: list[int] | None = None
    ) -> tuple[list[int], list[int]]:
        """Process one step's requests (flat ids, ascending) and return (outcome per request, victims).

        insert_misses=False computes the misses on the host: they are counted but never inserted.
        `used` (ascending) replaces the requests for everything but the outcomes and the seen set: the
        items the step really computes with when substitutes replace misses.
        """
        self.policy.phase = 0
        if self.current_pass != pass_index:
            self.policy.begin_pass(pass_index)
            self.current_pass = pass_index

        requested_set = set(requested)
        hits = [item for item in requested if item in self.resident]
        misses = [item for item in requested if item not in self.resident]
        outcomes = []
        for item in requested:
            if item in self.resident:
                outcomes.append(OUTCOME_HIT)
            elif item not in self.seen:
                outcomes.append(OUTCOME_COMPULSORY)
            elif self.evicted_in_pass.get(item) == pass_index:
                outcomes.append(OUTCOME_COLLISION)
            else:
                outcomes.append(OUTCOME_CAPACITY)

        if used is not None:
            requested_set = set(used)
            hits = [item for item in used if item in self.resident]
            misses = [item for item in used if item not in self.resident]
        for item in hits:
            self.policy.on_hit(item, step)
        if not insert_misses:
            misses = []
        victims = self._evict_and_insert(requested_set, misses, pass_index, step)
        self.seen.update(requested)
        assert len(self.resident) <= self.capacity
        return outcomes, sorted(victims)

    def _evict_and_insert(self, protected, misses, pass_index, step) -> list[int]:
        victims = []
        requested_set = protected
        if self.order == "interleaved":
            for item in misses:
                if len(self.resident) == self.capacity:
                    victims.append(self._evict_one(requested_set, pass_index, step))
                self._insert(item, step)
        else:
            num_victims = max(0, len(self.resident) + len(misses) - self.capacity)
            for _ in range(num_victims):
                victims.append(self._evict_one(requested_set, pass_index, step))
            for item in misses:
                self._insert(item, step)
        return victims

    def run_prefetch(self, pass_index: int, step: int, protected: set[int], admitted: list[int]) -> list[int]:
        """Insert the prefetched items (flat ids, ascending) and return the victims, ascending."""
        self.policy.phase = 1
        # Items prefetched in this step are never its victims (this matters only in the interleaved order).
        victims = self._evict_and_insert(protected | set(admitted), admitted, pass_index, step)
        self.policy.phase = 0
        assert len(self.resident) <= self.capacity
        return sorted(victims)

    def _evict_one(self, requested_set, pass_index, step):
        victim = self.policy.evict_one(requested_set, step)
        assert victim in self.resident, f"step {step}: victim {victim} is not resident"
        assert victim not in requested_set, f"step {step}: victim {victim} is requested in this step"
        self.resident.remove(victim)
        self.evicted_in_pass[victim] = pass_index
        return victim

    def _insert(self, item, step):
        self.policy.on_insert(item, step)
        self.resident.add(item)


def _policy_params(policy: str, params: Any) -> dict:
    """Merge `params` (a dict, (name, value) pairs or a NamedTuple) into the policy's defaults."""
    if policy != "s3fifo":
        if params:
            raise ValueError(f"reference policy '{policy}' takes no hyper-parameters, got {params!r}")
        return {}
    merged = dict(S3FIFO_DEFAULTS)
    if params:
        overrides = params._asdict() if hasattr(params, "_asdict") else dict(params)
        unknown = sorted(set(overrides) - set(merged))
        if unknown:
            raise ValueError(f"reference policy 's3fifo' has no hyper-parameter {unknown}; it has {sorted(merged)}")
        merged.update(overrides)
    return merged


def simulate(
    trace,
    policy: str,
    capacity_slots: int,
    scope: str,
    params: Any = None,
    seed: int = 0,
    order: str = "interleaved",
) -> ReferenceResult:
    """Simulate one configuration of `policy` on `trace` step by step.

    capacity_slots is the total capacity C; `per-layer` scope gives each layer floor(C / L) slots.
    order "interleaved" takes the misses in ascending expert id and evicts one victim before inserting a
    miss into a full pool. order "victims-first" evicts all m victims one by one and then inserts the
    misses, as in steps 3 and 4 of the contract. Raises `CapacityError` when a step requests more experts
    than its pool has slots.
    """
    if policy not in POLICY_CLASSES:
        raise ValueError(f"unknown reference policy '{policy}'; known policies: {', '.join(POLICIES)}")
    if scope not in SCOPES:
        raise ValueError(f"invalid scope '{scope}': expected one of {', '.join(SCOPES)}")
    if order not in ORDERS:
        raise ValueError(f"invalid order '{order}': expected one of {', '.join(ORDERS)}")
    num_passes, num_layers, num_experts = trace.num_passes, trace.num_layers, trace.num_experts
    requests = step_requests(trace)
    max_requests = max([1] + [len(experts) for per_layer in requests for experts in per_layer])
    pool_capacity = capacity_slots if scope == "global" else capacity_slots // num_layers
    for p in range(num_passes):
        for layer in range(num_layers):
            if len(requests[p][layer]) > pool_capacity:
                raise CapacityError(
                    f"reference: pool capacity {pool_capacity} is smaller than the {len(requests[p][layer])} "
                    f"experts requested at pass {p}, layer {layer}"
                )

    # Every step at which each flat id is requested (for Belady).
    request_steps: dict[int, list[int]] = collections.defaultdict(list)
    for p in range(num_passes):
        for layer in range(num_layers):
            for expert in requests[p][layer]:
                request_steps[layer * num_experts + expert].append(p * num_layers + layer)

    def make_pool(pool_size, position_of):
        context = {
            "seed": seed,
            "num_steps": num_passes * num_layers,
            "pool_size": pool_size,
            "position_of": position_of,
            "request_steps": request_steps,
            "capacity": pool_capacity,
            "params": _policy_params(policy, params),
        }
        return Pool(POLICY_CLASSES[policy](context), pool_capacity, order)

    if scope == "global":
        shared = make_pool(num_layers * num_experts, lambda item: item)
        pools = [shared] * num_layers
    else:
        pools = [make_pool(num_experts, lambda item: item % num_experts) for _ in range(num_layers)]

    outcomes = np.zeros((num_passes, num_layers, max_requests), np.int8)
    victims = np.full((num_passes, num_layers, max_requests), -1, np.int32)
    occupancy = np.zeros((num_passes, num_layers), np.int32)
    requests_per_layer = np.zeros(num_layers, np.int64)
    hits_per_layer = np.zeros(num_layers, np.int64)
    for p in range(num_passes):
        for layer in range(num_layers):
            flat_ids = [layer * num_experts + expert for expert in requests[p][layer]]
            pool = pools[layer]
            step_outcomes, step_victims = pool.run_step(p, p * num_layers + layer, flat_ids)
            outcomes[p, layer, : len(step_outcomes)] = step_outcomes
            victims[p, layer, : len(step_victims)] = step_victims
            occupancy[p, layer] = len(pool.resident)
            requests_per_layer[layer] += len(flat_ids)
            hits_per_layer[layer] += step_outcomes.count(OUTCOME_HIT)

    return ReferenceResult(
        requests=int((outcomes != OUTCOME_NONE).sum()),
        hits=int((outcomes == OUTCOME_HIT).sum()),
        compulsory=int((outcomes == OUTCOME_COMPULSORY).sum()),
        capacity=int((outcomes == OUTCOME_CAPACITY).sum()),
        collision=int((outcomes == OUTCOME_COLLISION).sum()),
        evictions=int((victims >= 0).sum()),
        requests_per_layer=requests_per_layer,
        hits_per_layer=hits_per_layer,
        outcomes=outcomes,
        victims=victims,
        occupancy=occupancy,
    )


# ---------------------------------------------------------------------------------------------------
# Prefetching (global scope only), written from the "Prefetching" section of docs/semantics.md.
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PrefetchReferenceResult:
    """A ReferenceResult plus the prefetch tallies and events, in the layout of `run_sweep`."""

    base: ReferenceResult
    prefetches: int
    prefetch_hits: int
    wasted: int
    prefetched: list[list[int]]  # per global step, flat ids in issue order
    prefetch_victims: list[list[int]]  # per global step, ascending
    prefetch_source: np.ndarray  # int32 [T, L, R], issuing step of each prefetch hit, else -1
    substitutes: np.ndarray  # int32 [T, L, R], the flat id that replaced each missed slot, else -1


def select_prefetch(scores, step, num_layers, num_steps, selection, top_k, threshold):
    """Return the selected (lookahead, rank, flat id, target step) tuples of one score row, in priority order."""
    depth, num_experts = scores.shape
    chosen = []
    for j in range(1, depth + 1):
        target = step + j
        if target >= num_steps:
            continue
        row = [(float(scores[j - 1, e]), e) for e in range(num_experts)]
        ranked = [e for _, e in sorted(row, key=lambda pair: (-pair[0], pair[1])) if scores[j - 1, e] > 0]
        if selection == "all":
            kept = ranked
        elif selection == "top-k":
            kept = ranked[:top_k]
        else:
            # float32 arithmetic, like the simulator; the tests use dyadic scores so sums are exact.
            total = np.float32(0)
            for e in ranked:
                total = np.float32(total + scores[j - 1, e])
            bound = np.float32(np.float32(threshold) * total)
            kept, before = [], np.float32(0)
            for e in ranked:
                if before >= bound:
                    break
                kept.append(e)
                before = np.float32(before + scores[j - 1, e])
        layer = target % num_layers
        chosen.extend((j, rank, layer * num_experts + e, target) for rank, e in enumerate(kept))
    return chosen


def simulate_prefetch(
    trace,
    policy: str,
    capacity_slots: int,
    scores: np.ndarray,
    selection: str,
    *,
    top_k: int = 0,
    threshold: float = 1.0,
    budget: int = 0,
    params: Any = None,
    seed: int = 0,
    order: str = "victims-first",
    miss_mode: str = "demand",
    router_scores: np.ndarray | None = None,
    substitute_candidates: int = 0,
) -> PrefetchReferenceResult:
    """Simulate one configuration with a prefetcher whose score table is `scores` [T, L, D, E] (global scope).

    Miss mode "substitute" replaces misses, in ascending expert id, by the resident, unrequested experts
    among the `substitute_candidates` that `router_scores` [T, L, E] ranks highest (ties to the smaller id).
    """
    num_passes, num_layers, num_experts = trace.num_passes, trace.num_layers, trace.num_experts
    num_steps = num_passes * num_layers
    requests = step_requests(trace)
    max_requests = max([1] + [len(experts) for per_layer in requests for experts in per_layer])
    request_steps: dict[int, list[int]] = collections.defaultdict(list)
    for p in range(num_passes):
        for layer in range(num_layers):
            for expert in requests[p][layer]:
                request_steps[layer * num_experts + expert].append(p * num_layers + layer)
    context = {
        "seed": seed,
        "num_steps": num_steps,
        "pool_size": num_layers * num_experts,
        "position_of": lambda item: item,
        "request_steps": request_steps,
        "capacity": capacity_slots,
        "params": _policy_params(policy, params),
    }
    pool = Pool(POLICY_CLASSES[policy](context), capacity_slots, order)

    pending: dict[int, tuple[int, int]] = {}  # flat id -> (target step, issuing step)
    outcomes = np.zeros((num_passes, num_layers, max_requests), np.int8)
    victims = np.full((num_passes, num_layers, max_requests), -1, np.int32)
    source = np.full((num_passes, num_layers, max_requests), -1, np.int32)
    occupancy = np.zeros((num_passes, num_layers), np.int32)
    requests_per_layer = np.zeros(num_layers, np.int64)
    hits_per_layer = np.zeros(num_layers, np.int64)
    prefetched, prefetch_victims = [], []
    substitutes = np.full((num_passes, num_layers, max_requests), -1, np.int32)
    prefetch_hits = wasted = evictions = 0
    for p in range(num_passes):
        for layer in range(num_layers):
            step = p * num_layers + layer
            flat_ids = [layer * num_experts + expert for expert in requests[p][layer]]
            for slot, item in enumerate(flat_ids):
                if item in pool.resident and item in pending:
                    source[p, layer, slot] = pending[item][1]
                    prefetch_hits += 1
            used = None
            if miss_mode == "substitute":
                row = [(-float(router_scores[p, layer, e]), e) for e in range(num_experts)]
                ranked = [layer * num_experts + e for _, e in sorted(row)[:substitute_candidates]]
                free = [item for item in ranked if item in pool.resident and item not in flat_ids]
                used = [item for item in flat_ids if item in pool.resident]
                for slot, item in enumerate(flat_ids):
                    if item in pool.resident:
                        continue
                    if free:
                        substitutes[p, layer, slot] = free.pop(0)
                        used.append(int(substitutes[p, layer, slot]))
                    else:
                        used.append(item)
                used.sort()
            step_outcomes, step_victims = pool.run_step(
                p, step, flat_ids, insert_misses=miss_mode != "host", used=used
            )
            for item in flat_ids + step_victims:
                if item in pending:
                    wasted += item in step_victims
                    del pending[item]
            outcomes[p, layer, : len(step_outcomes)] = step_outcomes
            victims[p, layer, : len(step_victims)] = step_victims
            evictions += len(step_victims)

            selected = select_prefetch(scores[p, layer], step, num_layers, num_steps, selection, top_k, threshold)
            protected = set(flat_ids) | set(used or []) | {item for item, (target, _) in pending.items() if target > step}
            protected |= {item for _, _, item, _ in selected if item in pool.resident}
            open_ = [(item, target) for _, _, item, target in selected if item not in pool.resident][:budget]
            room = capacity_slots - len(pool.resident) + len(pool.resident - protected)
            admitted = open_[: max(0, min(budget, room))]
            step_prefetch_victims = pool.run_prefetch(p, step, protected, sorted(item for item, _ in admitted))
            for item in step_prefetch_victims:
                if item in pending:
                    wasted += 1
                    del pending[item]
            for item, target in admitted:
                pending[item] = (target, step)
            prefetched.append([item for item, _ in admitted])
            prefetch_victims.append(step_prefetch_victims)
            evictions += len(step_prefetch_victims)
            occupancy[p, layer] = len(pool.resident)
            requests_per_layer[layer] += len(flat_ids)
            hits_per_layer[layer] += step_outcomes.count(OUTCOME_HIT)

    base = ReferenceResult(
        requests=int((outcomes != OUTCOME_NONE).sum()),
        hits=int((outcomes == OUTCOME_HIT).sum()),
        compulsory=int((outcomes == OUTCOME_COMPULSORY).sum()),
        capacity=int((outcomes == OUTCOME_CAPACITY).sum()),
        collision=int((outcomes == OUTCOME_COLLISION).sum()),
        evictions=evictions,
        requests_per_layer=requests_per_layer,
        hits_per_layer=hits_per_layer,
        outcomes=outcomes,
        victims=victims,
        occupancy=occupancy,
    )
    return PrefetchReferenceResult(
        base=base,
        prefetches=sum(len(items) for items in prefetched),
        prefetch_hits=prefetch_hits,
        wasted=wasted,
        prefetched=prefetched,
        prefetch_victims=prefetch_victims,
        prefetch_source=source,
        substitutes=substitutes,
    )

"""Sweeps: many (policy, capacity, hyper-parameter, seed, prefetcher) configurations over one trace.

Configurations are grouped by policy (and, with prefetching or another miss mode, by prefetcher,
lookahead and miss mode); each group is one jit-compiled, vmapped call of
`specmd_jax.sim.engine.simulate_batch` or `specmd_jax.sim.prefetch.simulate_prefetch_batch`, so a
capacity sweep of one policy compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from specmd_jax.policies.base import NEVER
from specmd_jax.policies.registry import get_policy
from specmd_jax.prefetch.sources import check_lookahead
from specmd_jax.prefetch.registry import (
    DEFAULT_TRAIN_FRACTION,
    PREFETCHERS,
    PrefetchConfig,
    build_score_table,
    check_score_tables,
    resolved_params,
)
from specmd_jax.sim.engine import SweepTotals, per_layer_pool_totals, simulate_batch
from specmd_jax.sim.prefetch import MISS_MODES, PrefetchParams, next_request_table, simulate_prefetch_batch
from specmd_jax.sim.requests import StepRequests, build_requests, mean_router_probabilities, request_presence
from specmd_jax.sim.belady_stack import fits_int32, simulate_belady_stack
from specmd_jax.sim.frontier import fifo_per_layer_hits, simulate_fifo_frontier
from specmd_jax.sim.least_stale_layers import least_stale_hits
from specmd_jax.sim.stack import simulate_lru_stack
from specmd_jax.traces.trace import Trace

logger = logging.getLogger(__name__)

SCOPES = ("global", "per-layer")
SUBSTITUTE_CANDIDATES_PER_TOP_K = 2
"""Miss mode `substitute` draws substitutes from the router's 2 x top-k highest-scored experts of the layer."""
INT32_MAX = 2**31 - 1


class CapacityError(ValueError):
    """A capacity that cannot be simulated on a trace (too small for a step's request set)."""


@dataclasses.dataclass(frozen=True)
class Capacity:
    """A capacity as the user gave it: a fraction of all L x E experts, or a slot count."""

    value: float | int
    is_fraction: bool

    @classmethod
    def parse(cls, text: str) -> Capacity:
        """Parse "0.05" (a fraction in (0, 1]) or "96" (a slot count)."""
        text = text.strip()
        try:
            if any(ch in text for ch in ".eE"):
                fraction = float(text)
                if not 0.0 < fraction <= 1.0:
                    raise ValueError
                return cls(fraction, True)
            slots = int(text)
            if slots < 1:
                raise ValueError
            return cls(slots, False)
        except ValueError:
            raise ValueError(
                f"invalid capacity '{text}': expected a fraction in (0, 1] such as 0.05, or a slot count >= 1 such as 96"
            ) from None

    def slots(self, num_layers: int, num_experts: int) -> int:
        """Total slots: floor(f * L * E + 0.5) for a fraction f, else the count itself."""
        if self.is_fraction:
            return int(np.floor(self.value * num_layers * num_experts + 0.5))
        return int(self.value)

    def __str__(self) -> str:
        return f"{self.value:g}" if self.is_fraction else str(self.value)


def pool_capacity(total_slots: int, scope: str, num_layers: int) -> int:
    """Slots of one pool: all of them for `global` scope, floor(C / L) per layer for `per-layer`."""
    check_scope(scope)
    return total_slots if scope == "global" else total_slots // num_layers


def check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"invalid scope '{scope}': expected one of {', '.join(SCOPES)}")


def check_capacity(total_slots: int, scope: str, requests: StepRequests) -> None:
    """Raise `CapacityError` when a pool of this capacity cannot hold some step's request set."""
    needed = int(requests.counts.max(initial=0))
    slots = pool_capacity(total_slots, scope, requests.num_layers)
    if slots < needed:
        where = np.unravel_index(int(np.argmax(requests.counts)), requests.counts.shape)
        if scope == "global":
            raise CapacityError(
                f"a capacity of {_slots_text(total_slots)} is smaller than the {needed} distinct experts requested "
                f"at pass {where[0]}, layer {where[1]}; use at least {_slots_text(needed)}"
            )
        raise CapacityError(
            f"a capacity of {_slots_text(total_slots)} gives {_slots_text(slots)} per layer in per-layer scope, "
            f"fewer than the {needed} distinct experts requested at pass {where[0]}, layer {where[1]}; "
            f"use at least {_slots_text(needed * requests.num_layers)}"
        )


def _slots_text(count: int) -> str:
    return f"{count} slot" if count == 1 else f"{count} slots"


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """One configuration: a policy, a total capacity in slots, its hyper-parameters, a seed, and
    optionally a prefetcher and a miss-handling mode (`demand` loads a missed expert, `host` computes it
    on the host without inserting it, `substitute` uses a resident expert of the router's candidates
    instead when there is one)."""

    policy: str
    capacity: int
    params: Any = ()  # a dict or (name, value) pairs; stored as sorted pairs so configs are hashable
    seed: int = 0
    prefetch: PrefetchConfig | None = None
    miss: str = "demand"

    def __post_init__(self):
        if self.prefetch is not None and not isinstance(self.prefetch, PrefetchConfig):
            raise ValueError(f"SimConfig.prefetch: expected a PrefetchConfig or None, got {self.prefetch!r}")
        if self.miss not in MISS_MODES:
            raise ValueError(f"SimConfig.miss: expected one of {', '.join(MISS_MODES)}, got {self.miss!r}")
        pairs = self.params.items() if isinstance(self.params, dict) else self.params
        object.__setattr__(self, "params", tuple(sorted((str(name), value) for name, value in pairs)))
        for field, value, low in (("capacity", self.capacity, 1), ("seed", self.seed, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= INT32_MAX:
                raise ValueError(f"SimConfig.{field}: expected an integer in [{low}, {INT32_MAX}], got {value!r}")
        for name, value in self.params:
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ValueError(f"SimConfig.params['{name}']: expected a number, got {value!r}")

    @property
    def label(self) -> str:
        """Policy name with its non-default hyper-parameters, e.g. "s3fifo(small_fraction=0.2)"."""
        if not self.params:
            return self.policy
        inner = ",".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}" for key, value in self.params)
        return f"{self.policy}({inner})"


@dataclasses.dataclass(frozen=True)
class SimResult:
    """Totals of one configuration."""

    config: SimConfig
    scope: str
    effective_capacity: int  # slots actually simulated: L * floor(C / L) in per-layer scope, else C
    requests: int
    hits: int
    compulsory_misses: int
    capacity_misses: int
    collision_misses: int
    evictions: int
    requests_per_layer: np.ndarray
    hits_per_layer: np.ndarray
    prefetches: int = 0  # experts transferred by the prefetch phases
    prefetch_hits: int = 0  # requests that hit a prefetched expert before any other request used it
    wasted_prefetches: int = 0  # prefetched experts evicted before any request used them
    substitutions: int = 0  # misses served by a resident substitute (miss mode `substitute`), routing changes

    @property
    def misses(self) -> int:
        return self.requests - self.hits

    @property
    def prefetch_precision(self) -> float:
        """Share of prefetches that a request used; NaN without prefetches."""
        return self.prefetch_hits / self.prefetches if self.prefetches else float("nan")

    @property
    def prefetch_recall(self) -> float:
        """Share of the requests not already cached that prefetching supplied: prefetch hits / (prefetch hits + misses)."""
        covered = self.prefetch_hits + self.misses
        return self.prefetch_hits / covered if covered else float("nan")

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else float("nan")

    @property
    def hit_rate_per_layer(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.hits_per_layer / self.requests_per_layer


def _policy_params(config: SimConfig):
    policy = get_policy(config.policy)
    defaults = policy.default_params()
    if not config.params:
        return defaults
    if not hasattr(defaults, "_replace"):
        raise ValueError(f"policy '{config.policy}' takes no hyper-parameters, got {sorted(config.params)}")
    given = dict(config.params)
    unknown = sorted(set(given) - set(defaults._fields))
    if unknown:
        raise ValueError(f"policy '{config.policy}' has no hyper-parameter {unknown}; it has {list(defaults._fields)}")
    params = defaults._replace(**given)
    if policy.check_params is not None:
        policy.check_params(params)
    return params


def _stack(trees: Sequence[Any]):
    return jax.tree.map(lambda *leaves: jnp.stack([jnp.asarray(leaf) for leaf in leaves]), *trees)


def run_sweep(
    trace: Trace | StepRequests,
    configs: Iterable[SimConfig],
    *,
    scope: str = "global",
    num_experts: int | None = None,
    record_events: bool = False,
    unroll: int = 1,
    fast_paths: bool = True,
    train_fraction: float = DEFAULT_TRAIN_FRACTION,
    score_tables: Mapping[str, np.ndarray] | None = None,
    prefetch_inputs: PrefetchInputs | None = None,
) -> list[SimResult] | tuple[list[SimResult], dict[SimConfig, Any]]:
    """Simulate every configuration; one compiled, vmapped call per group of configurations.

    Without event recording, prefetching or host misses, four policies take exact fast paths unless
    `fast_paths` is False (then they take the generic scan, like every other policy): LRU runs as one
    stack-distance pass for all its capacities (`specmd_jax.sim.stack`), and FIFO keeps insertion numbers
    and an eviction front instead of a rank per item (`specmd_jax.sim.frontier`). In `per-layer` scope,
    Belady runs as one OPT stack pass for all its capacities (`specmd_jax.sim.belady_stack`) and
    Least-Stale by counting ranks on bit sets of items (`specmd_jax.sim.least_stale_layers`).

    Prefetching needs a Trace (not StepRequests) and `global` scope. `train_fraction` is the share of
    passes on which trained prefetchers (co-occurrence, top-k, score) estimate their tables;
    `score_tables` supplies tables by prefetcher name (required for `learned`, see
    `specmd_jax.prefetch.registry.build_score_table`). Several calls on one trace can share the score
    tables through one `PrefetchInputs` (then `train_fraction` and `score_tables` are taken from it).

    Raises `CapacityError` if any capacity is infeasible (check with `check_capacity` first to skip).
    With `record_events`, also return each configuration's events as numpy arrays [T, L, ...]:
    `StepEvents`, or `PrefetchEvents` for configurations with a prefetcher or host misses.
    """
    check_scope(scope)
    if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1:
        raise ValueError(f"invalid unroll {unroll!r}: expected an integer >= 1")
    if isinstance(trace, Trace):
        requests = build_requests(trace)
        num_experts = trace.num_experts
    else:
        requests = trace
        if num_experts is None:
            raise ValueError("num_experts is required when passing StepRequests")
    configs = list(configs)
    for config in configs:
        check_capacity(config.capacity, scope, requests)
        if _uses_prefetch_scan(config):
            if scope != "global":
                raise ValueError(
                    f"configuration {config.label}: prefetching and host misses are simulated in global scope "
                    f"only, got scope '{scope}'"
                )
            if not isinstance(trace, Trace):
                raise ValueError(f"configuration {config.label}: prefetching needs the Trace, not StepRequests")

    experts = jnp.asarray(requests.experts)
    next_step = jnp.asarray(requests.next_step)
    groups: dict[tuple, list[int]] = {}
    for index, config in enumerate(configs):
        groups.setdefault(_group_key(config), []).append(index)

    if prefetch_inputs is None and isinstance(trace, Trace):
        prefetch_inputs = PrefetchInputs(trace, train_fraction=train_fraction, score_tables=score_tables, requests=requests)
    results: list[SimResult | None] = [None] * len(configs)
    events_by_config: dict[SimConfig, Any] = {}
    for key, indices in groups.items():
        name = key[0]
        policy = get_policy(name)
        group = [configs[i] for i in indices]
        params = _stack([_policy_params(config) for config in group])
        capacities = jnp.asarray([pool_capacity(c.capacity, scope, requests.num_layers) for c in group], jnp.int32)
        seeds = jnp.asarray([c.seed for c in group], jnp.int32)
        prefetch_totals = None
        if len(key) > 1:
            logger.info("simulating %d configurations of %s with prefetcher %s (lookahead %s, %s misses)", len(group), *key)
            totals, prefetch_totals, events = _run_prefetch_group(
                policy, group, params, capacities, seeds, experts, next_step, prefetch_inputs, key,
                num_experts=num_experts, record_events=record_events, unroll=unroll,
            )
        elif fast_paths and not record_events and _takes_fast_path(name, scope, requests, num_experts):
            logger.info("simulating %d configurations of %s (%s scope, fast path)", len(group), name, scope)
            # Exact: tests/test_stack_lru.py, test_fifo_frontier.py, test_belady_stack.py and
            # test_least_stale_layers.py compare each fast path with the generic scan.
            totals = _FAST_PATHS[name](capacities, experts, next_step, scope=scope, num_experts=num_experts)
            events = None
        else:
            logger.info("simulating %d configurations of %s (%s scope)", len(group), name, scope)
            params, capacities, seeds = _spread_over_devices((params, capacities, seeds), len(group))
            totals, events = simulate_batch(
                policy, params, capacities, seeds, experts, next_step,
                scope=scope, num_experts=num_experts, record_events=record_events, unroll=unroll,
            )
        totals = jax.device_get(totals)
        prefetch_totals = jax.device_get(prefetch_totals)
        for position, index in enumerate(indices):
            effective = pool_capacity(configs[index].capacity, scope, requests.num_layers)
            if scope == "per-layer":
                effective *= requests.num_layers
            results[index] = _result(configs[index], scope, effective, totals, position, prefetch_totals)
            if record_events:
                events_by_config[configs[index]] = jax.tree.map(lambda leaf: np.asarray(leaf[position]), events)
    if record_events:
        return results, events_by_config
    return results


def _lru_stack(capacities, experts, next_step, *, scope, num_experts):
    # One stack pass serves all capacities at once. Per-layer pools spread over the devices by layer.
    if scope == "per-layer":
        (spread_experts,) = _spread_layers(experts)
        totals = simulate_lru_stack(capacities, spread_experts, scope=scope, num_experts=num_experts)
        return _first_layers(totals, experts.shape[1])
    return simulate_lru_stack(capacities, experts, scope=scope, num_experts=num_experts)


def _fifo_over_devices(capacities, experts, next_step, *, scope, num_experts):
    # Per-layer pools spread over the host devices by layer, a global pool by capacity.
    if scope == "per-layer":
        return _per_layer_over_devices(fifo_per_layer_hits, capacities, experts, num_experts=num_experts)
    padded = _spread_over_devices(capacities, capacities.shape[0])
    totals = simulate_fifo_frontier(padded, experts, scope=scope, num_experts=num_experts)
    return jax.tree.map(lambda leaf: leaf[: capacities.shape[0]], totals)


def _padded_layers(num_layers: int) -> int:
    """Layer count after `_spread_layers` pads it to a multiple of the host devices."""
    devices = len(jax.local_devices())
    if devices < 2 or num_layers < 2:
        return num_layers
    return -(-num_layers // devices) * devices


def _spread_layers(*arrays):
    """Shard the layer axis of [T, L, R] arrays over the host devices, padding it with empty (-1) layers."""
    num_layers = arrays[0].shape[1]
    if len(jax.local_devices()) < 2 or num_layers < 2:
        return arrays
    padded_layers = _padded_layers(num_layers)
    sharding = jax.sharding.NamedSharding(_layer_mesh(), jax.sharding.PartitionSpec(None, "layers", None))
    if padded_layers > num_layers:
        padding = ((0, 0), (0, padded_layers - num_layers), (0, 0))
        arrays = [jnp.pad(array, padding, constant_values=-1) for array in arrays]
    return tuple(jax.device_put(array, sharding) for array in arrays)


def _renumber_steps(next_step, num_layers: int, padded_layers: int):
    """Renumber next-request steps p * L + l as p * padded_layers + l; other values stay."""
    finite = (next_step >= 0) & (next_step != NEVER)
    return jnp.where(finite, next_step // num_layers * padded_layers + next_step % num_layers, next_step)


def _layer_mesh() -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.asarray(jax.local_devices()), ("layers",))


@functools.lru_cache(maxsize=None)
def _compiled_core(core, num_experts: int, num_inputs: int, num_devices: int):
    """Jit `core`; on several devices, split its [T, L, ...] inputs and its outputs (hits [C, L], seen [L]) by layer.

    The cache keeps one jitted function per core, so repeated sweeps do not compile again. Each device
    runs its own layers' pools with no communication. Sharding the inputs alone also works when the step
    is written with vmap. A step that indexes the layer axis itself then ran about 50x slower on 2 host
    devices, probably because XLA's partitioner cannot split its gathers by layer.
    """
    bound = functools.partial(core, num_experts=num_experts)
    if num_devices < 2:
        return jax.jit(bound)
    specs = [jax.sharding.PartitionSpec(None, "layers")] * num_inputs
    mapped = jax.shard_map(
        bound,
        mesh=_layer_mesh(),
        in_specs=(jax.sharding.PartitionSpec(), *specs),
        out_specs=(jax.sharding.PartitionSpec(None, "layers"), jax.sharding.PartitionSpec("layers")),
        # The cores build their scan carries from constants, which the varying-axis check rejects.
        check_vma=False,
    )
    return jax.jit(mapped)


def _per_layer_over_devices(core, capacities, *inputs, num_experts: int) -> SweepTotals:
    """Run a per-layer core on inputs [T, L, ...] with the layers spread over the host devices.

    `core(capacities, *inputs, num_experts=...)` returns the hits int32 [C, L] and the items each layer
    requested int32 [L]. With two or more layers and devices, empty layers pad the layer count to a
    multiple of the devices. A single layer runs on one device.
    """
    experts = inputs[0]
    num_layers = experts.shape[1]
    padded_layers = _padded_layers(num_layers)
    num_devices = len(jax.local_devices()) if num_layers > 1 else 1
    if padded_layers > num_layers:
        inputs = [
            jnp.pad(array, [(0, 0), (0, padded_layers - num_layers)] + [(0, 0)] * (array.ndim - 2), constant_values=-1)
            for array in inputs
        ]
    hits, seen = _compiled_core(core, num_experts, len(inputs), num_devices)(capacities, *inputs)
    return per_layer_pool_totals(experts, capacities, hits[:, :num_layers], seen[:num_layers])


def _first_layers(totals: SweepTotals, num_layers: int) -> SweepTotals:
    return totals._replace(
        requests_per_layer=totals.requests_per_layer[:, :num_layers], hits_per_layer=totals.hits_per_layer[:, :num_layers]
    )


def _belady_over_devices(capacities, experts, next_step, *, scope, num_experts):
    del scope  # per-layer only, see _takes_fast_path
    # The OPT stack step is written with vmap over layers, so sharding its inputs by layer splits the work
    # without shard_map. On 2 host devices that measured 1.2 s against 1.4-1.6 s under shard_map.
    # Keys count steps p * L + l, so the padded layer count renumbers the next-request steps.
    num_layers, padded_layers = experts.shape[1], _padded_layers(experts.shape[1])
    if padded_layers > num_layers:
        next_step = _renumber_steps(next_step, num_layers, padded_layers)
    spread_experts, spread_next = _spread_layers(experts, next_step)
    totals = simulate_belady_stack(capacities, spread_experts, spread_next, num_experts=num_experts)
    return _first_layers(totals, experts.shape[1])


def _least_stale_over_devices(capacities, experts, next_step, *, scope, num_experts):
    del scope  # per-layer only, see _takes_fast_path
    return _per_layer_over_devices(least_stale_hits, capacities, experts, num_experts=num_experts)


_FAST_PATHS = {
    "lru": _lru_stack,
    "fifo": _fifo_over_devices,
    "belady": _belady_over_devices,
    "least-stale": _least_stale_over_devices,
}


def _takes_fast_path(name: str, scope: str, requests: StepRequests, num_experts: int) -> bool:
    if requests.num_passes == 0:
        return False
    if name == "belady":
        # The OPT stack only pays for itself on per-layer pools (see specmd_jax.sim.belady_stack), and its
        # int32 keys grow with the number of steps, counted over the layers padded for the devices.
        return scope == "per-layer" and fits_int32(requests.next_step, num_experts, _padded_layers(requests.num_layers))
    if name == "least-stale":
        # Rank counting relies on every step starting a pass for its pool, which is true in per-layer scope only.
        return scope == "per-layer"
    return name in _FAST_PATHS


def _uses_prefetch_scan(config: SimConfig) -> bool:
    return config.prefetch is not None or config.miss != "demand"


def _group_key(config: SimConfig) -> tuple:
    """Configurations with equal keys share one compiled call."""
    if not _uses_prefetch_scan(config):
        return (config.policy,)
    if config.prefetch is None:
        return (config.policy, "none", 1, config.miss)
    return (config.policy, config.prefetch.name, config.prefetch.lookahead, config.miss)


class PrefetchInputs:
    """Score tables and the next-request table of one trace, built on first use and shared by all groups."""

    def __init__(
        self,
        trace: Trace,
        *,
        train_fraction: float = DEFAULT_TRAIN_FRACTION,
        score_tables: Mapping[str, np.ndarray] | None = None,
        requests: StepRequests | None = None,
    ):
        check_score_tables(score_tables)
        self.trace = trace
        self.requests = build_requests(trace) if requests is None else requests
        self.train_fraction = train_fraction
        self.score_tables = score_tables
        self._presence = None
        self._next_use = None
        self._router = None
        self._tables: dict[tuple[str, int], jax.Array] = {}

    @property
    def presence(self) -> np.ndarray:
        if self._presence is None:
            self._presence = request_presence(self.trace)
        return self._presence

    def next_use(self) -> jax.Array:
        if self._next_use is None:
            self._next_use = jnp.asarray(next_request_table(self.presence))
        return self._next_use

    def router_scores(self) -> jax.Array:
        """float32 [T * L, E], the router's mean probabilities per step (for miss mode `substitute`)."""
        if self._router is None:
            table = mean_router_probabilities(self.trace)
            self._router = jnp.asarray(table.reshape(-1, table.shape[-1]))
        return self._router

    def table(self, name: str, lookahead: int) -> jax.Array:
        key = (name, lookahead)
        if key not in self._tables:
            T, L, E = self.presence.shape
            if name == "none":
                table = np.zeros((T, L, 1, E), np.float32)
            else:
                table = build_score_table(
                    self.trace, self.presence, PREFETCHERS[name], lookahead,
                    train_fraction=self.train_fraction, score_tables=self.score_tables,
                )
            self._tables[key] = jnp.asarray(table.reshape(T * L, table.shape[2], E))
        return self._tables[key]


def _run_prefetch_group(policy, group, params, capacities, seeds, experts, next_step, inputs, key, *, num_experts, record_events, unroll):
    _, name, lookahead, miss = key
    trace = inputs.trace
    if name == "none":
        # Host or substitute misses without prefetching: the prefetch phase runs with a zero budget.
        resolved = [(1, 1.0, 0) for _ in group]
    else:
        for config in group:
            check_lookahead(config.prefetch.lookahead, trace.num_layers)
        resolved = [resolved_params(config.prefetch, trace.metadata.top_k, trace.num_experts) for config in group]
    prefetch_params = PrefetchParams(
        top_k=jnp.asarray([r[0] for r in resolved], jnp.int32),
        threshold=jnp.asarray([r[1] for r in resolved], jnp.float32),
        budget=jnp.asarray([r[2] for r in resolved], jnp.int32),
    )
    max_budget = max(1, max(r[2] for r in resolved))
    selection = "all" if name == "none" else PREFETCHERS[name].selection
    router_scores = inputs.router_scores() if miss == "substitute" else None
    return simulate_prefetch_batch(
        policy, params, prefetch_params, capacities, seeds, experts, next_step,
        inputs.table(name, lookahead), inputs.next_use(), router_scores,
        num_experts=num_experts, selection=selection, max_budget=max_budget, miss_mode=miss,
        substitute_candidates=SUBSTITUTE_CANDIDATES_PER_TOP_K * trace.metadata.top_k,
        record_events=record_events, unroll=unroll,
    )


def _spread_over_devices(batch, num_configs: int):
    """Shard the config axis over all local devices, padding it by repeating the last config.

    XLA:CPU runs one simulation on one thread, so several host devices (XLA_FLAGS=
    --xla_force_host_platform_device_count=N) use several cores. Results of padded configs are ignored
    because callers index the first `num_configs` entries only.
    """
    devices = jax.local_devices()
    if len(devices) < 2 or num_configs < 2:
        return batch
    padded = -(-num_configs // len(devices)) * len(devices)
    batch = jax.tree.map(lambda leaf: jnp.concatenate([leaf, jnp.repeat(leaf[-1:], padded - num_configs, axis=0)]), batch)
    mesh = jax.sharding.Mesh(np.asarray(devices), ("configs",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("configs"))
    return jax.device_put(batch, sharding)


def _result(config: SimConfig, scope: str, effective: int, totals: SweepTotals, position: int, prefetch_totals=None) -> SimResult:
    prefetch = {}
    if prefetch_totals is not None:
        prefetch = {
            "prefetches": int(prefetch_totals.prefetches[position]),
            "prefetch_hits": int(prefetch_totals.prefetch_hits[position]),
            "wasted_prefetches": int(prefetch_totals.wasted[position]),
            "substitutions": int(prefetch_totals.substitutions[position]),
        }
    return SimResult(
        config=config,
        scope=scope,
        effective_capacity=effective,
        requests=int(totals.requests[position]),
        hits=int(totals.hits[position]),
        compulsory_misses=int(totals.compulsory[position]),
        capacity_misses=int(totals.capacity[position]),
        collision_misses=int(totals.collision[position]),
        evictions=int(totals.evictions[position]),
        requests_per_layer=np.asarray(totals.requests_per_layer[position]),
        hits_per_layer=np.asarray(totals.hits_per_layer[position]),
        **prefetch,
    )

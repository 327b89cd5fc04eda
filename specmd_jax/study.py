"""The main job as a function: a policy x prefetcher x capacity sweep with the bounds at every capacity.

The CLI (`specmd-jax simulate`) and the notebooks call `run_study`. It turns user-level capacities into
slot counts, skips infeasible ones with the reason, and pairs each result with Belady's hit rate and,
when prefetchers are swept, the oracle bound (oracle prefetching with Belady eviction).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from tqdm import tqdm

from specmd_jax.prefetch.registry import DEFAULT_TRAIN_FRACTION, PrefetchConfig
from specmd_jax.report import ReportRow, SkippedCapacity
from specmd_jax.sim.requests import build_requests
from specmd_jax.sim.sweep import Capacity, CapacityError, PrefetchInputs, SimConfig, check_capacity, run_sweep
from specmd_jax.timing import MODEL_PRESETS, Hardware, ModelShape, TimingResult, estimate_timing, get_model_shape
from specmd_jax.timing.estimate import check_model_matches
from specmd_jax.traces.trace import Trace

BOUND_POLICY = "belady"
BOUND_PREFETCH = PrefetchConfig("oracle")
BASELINE_POLICY = "lru"


def build_configs(
    policies: Sequence[str],
    slots: Sequence[int],
    grid: dict[str, dict[str, list]],
    seeds: Sequence[int],
    prefetchers: Sequence[PrefetchConfig | None] = (None,),
    miss: str = "demand",
) -> list[SimConfig]:
    """List every (policy, hyper-parameter combination, seed, prefetcher, capacity); seeds only multiply `random`."""
    configs = []
    for policy in policies:
        names = sorted(grid.get(policy, {}))
        combos = list(itertools.product(*(grid[policy][name] for name in names))) if names else [()]
        policy_seeds = seeds if policy == "random" else [0]
        for combo, seed, prefetch, capacity in itertools.product(combos, policy_seeds, prefetchers, slots):
            configs.append(SimConfig(policy, capacity, dict(zip(names, combo)), seed, prefetch=prefetch, miss=miss))
    return configs



def model_shape_for(trace: Trace, name: str | None) -> ModelShape:
    """Return the model preset `name`, or the one preset whose layers, experts and top-k match `trace`."""
    if name is not None:
        shape = get_model_shape(name)
        check_model_matches(trace, shape)
        return shape
    meta = trace.metadata
    matches = [
        shape for shape in MODEL_PRESETS.values()
        if (shape.num_moe_layers, shape.num_experts, shape.top_k) == (meta.num_layers, meta.num_experts, meta.top_k)
    ]
    if len(matches) != 1:
        if matches:
            hint = f"several presets match ({', '.join(shape.name for shape in matches)}); name one with --model"
        else:
            hint = (
                "no model-shape preset has these counts, so the timing model cannot be applied; presets: "
                + ", ".join(f"{shape.name} ({shape.num_moe_layers}x{shape.num_experts}, top-{shape.top_k})" for shape in MODEL_PRESETS.values())
            )
        raise ValueError(
            f"trace '{meta.model}' has {meta.num_layers} MoE layers, {meta.num_experts} experts, top-{meta.top_k}: {hint}"
        )
    return matches[0]


def run_study(
    trace: Trace,
    policies: Sequence[str],
    capacities: Sequence[Capacity | str | int | float],
    *,
    scope: str = "global",
    grid: dict[str, dict[str, list]] | None = None,
    seeds: Sequence[int] = (0,),
    unroll: int = 1,
    progress: bool = False,
    hardware: Hardware | Sequence[Hardware] | None = None,
    model: ModelShape | None = None,
    prefetchers: Sequence[PrefetchConfig | None] = (None,),
    miss: str = "demand",
    train_fraction: float = DEFAULT_TRAIN_FRACTION,
    score_tables: dict | None = None,
) -> tuple[list[ReportRow], list[SkippedCapacity]]:
    """Simulate every policy with every prefetcher at every feasible capacity; return report rows and skipped capacities.

    Capacities may be `Capacity` objects or their text form ("0.05" is a fraction, "96" a slot count).
    `prefetchers` lists PrefetchConfig entries, None meaning no prefetching; `miss` is the miss-handling
    mode of every configuration. Rows come in the order of `policies`, then prefetchers, then by capacity.

    Every row gets Belady's hit rate at its capacity (no prefetching) and, when a prefetcher is swept,
    the oracle bound: oracle prefetching with Belady eviction. With `hardware` (one preset or several;
    `model` defaults to the preset matching the trace), each configuration gets one row per hardware
    with its timing, the bounds' timing and LRU's without prefetching. That records every
    configuration's per-step events, which takes about T x L x (3R + 2B) x 4 bytes per configuration
    (B: the prefetch budget).
    """
    if hardware is None:
        hardwares = []
    elif isinstance(hardware, Hardware):
        hardwares = [hardware]
    else:
        hardwares = list(hardware)
    names = [item.name for item in hardwares]
    if len(set(names)) != len(names):
        raise ValueError(f"hardware presets listed more than once: {names}")
    if hardwares and model is None:
        model = model_shape_for(trace, None)
    parsed = [c if isinstance(c, Capacity) else Capacity.parse(str(c)) for c in capacities]
    unselected = sorted(set(grid or {}) - set(policies))
    if unselected:
        raise ValueError(f"hyper-parameter grid for {unselected}, which are not among the policies {list(policies)}")
    prefetchers = list(prefetchers) or [None]
    prefetching = any(prefetch is not None for prefetch in prefetchers)
    if (prefetching or miss != "demand") and scope != "global":
        raise ValueError(f"prefetching and host misses are simulated in global scope only, got scope '{scope}'")
    requests = build_requests(trace)

    # Feasibility first: an infeasible capacity is reported and skipped, the others go on.
    slots: list[int] = []
    skipped: list[SkippedCapacity] = []
    for capacity in parsed:
        count = capacity.slots(trace.num_layers, trace.num_experts)
        try:
            check_capacity(count, scope, requests)
        except CapacityError as error:
            skipped.append(SkippedCapacity(str(capacity), str(error)))
            continue
        if count in slots:
            skipped.append(SkippedCapacity(str(capacity), f"gives {count} slots, like an earlier capacity; simulated once"))
            continue
        slots.append(count)

    configs = build_configs(policies, slots, grid or {}, seeds, prefetchers, miss)
    belady = {count: SimConfig(BOUND_POLICY, count, miss=miss) for count in slots}
    bound = {count: SimConfig(BOUND_POLICY, count, prefetch=BOUND_PREFETCH, miss=miss) for count in slots} if prefetching else {}
    baseline = {count: SimConfig(BASELINE_POLICY, count, miss=miss) for count in slots} if hardwares else {}
    requested = list(dict.fromkeys(configs + list(belady.values()) + list(bound.values()) + list(baseline.values())))

    inputs = PrefetchInputs(trace, train_fraction=train_fraction, score_tables=score_tables, requests=requests)
    group_keys = list(dict.fromkeys(_group_of(config) for config in requested))
    results = {}
    timings: dict[tuple[SimConfig, str], TimingResult] = {}
    for key in tqdm(group_keys, desc="groups", unit="group", disable=not progress or not requested):
        group = [config for config in requested if _group_of(config) == key]
        if not hardwares:
            group_results = run_sweep(trace, group, scope=scope, unroll=unroll, prefetch_inputs=inputs)
        else:
            group_results, events = run_sweep(trace, group, scope=scope, unroll=unroll, record_events=True, prefetch_inputs=inputs)
            for config in group:
                for item in hardwares:
                    timings[config, item.name] = estimate_timing(trace, events[config], item, model, miss=config.miss)
        results.update(zip(group, group_results))

    total_experts = trace.num_layers * trace.num_experts
    rows = []
    for config in configs:
        count = config.capacity
        for name in names or [None]:
            rows.append(ReportRow(
                trace.name, results[config], total_experts, results[belady[count]].hit_rate,
                timing=timings.get((config, name)),
                belady_timing=timings.get((belady[count], name)),
                bound=results[bound[count]] if bound else None,
                bound_timing=timings.get((bound[count], name)) if bound else None,
                baseline_timing=timings.get((baseline[count], name)) if baseline else None,
            ))
    prefetch_order = {prefetch: index for index, prefetch in enumerate(prefetchers)}
    hardware_order = {name: index for index, name in enumerate(names)}
    rows.sort(key=lambda row: (
        hardware_order.get(row.timing.hardware.name, 0) if row.timing else 0,
        list(policies).index(row.result.config.policy),
        prefetch_order[row.result.config.prefetch],
        row.result.config.capacity,
    ))
    return rows, skipped


def _group_of(config: SimConfig) -> tuple:
    """Configurations that one run_sweep call simulates together (one progress-bar step)."""
    prefetch = config.prefetch
    return (config.policy, prefetch.name if prefetch else None, prefetch.lookahead if prefetch else 1, config.miss)

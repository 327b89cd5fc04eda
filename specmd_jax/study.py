"""The main job as a function: a policy x capacity sweep with the Belady bound at every capacity.

The CLI (`specmd-jax simulate`) and the notebooks call `run_study`. It turns user-level capacities into
slot counts, skips infeasible ones with the reason, and pairs each result with Belady's hit rate.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from tqdm import tqdm

from specmd_jax.report import ReportRow, SkippedCapacity
from specmd_jax.sim.requests import build_requests
from specmd_jax.sim.sweep import Capacity, CapacityError, SimConfig, check_capacity, run_sweep
from specmd_jax.timing import MODEL_PRESETS, Hardware, ModelShape, TimingResult, estimate_timing, get_model_shape
from specmd_jax.timing.estimate import check_model_matches
from specmd_jax.traces.trace import Trace

BOUND_POLICY = "belady"


def build_configs(policies: Sequence[str], slots: Sequence[int], grid: dict[str, dict[str, list]], seeds: Sequence[int]) -> list[SimConfig]:
    """List every (policy, hyper-parameter combination, seed, capacity); seeds only multiply `random`."""
    configs = []
    for policy in policies:
        names = sorted(grid.get(policy, {}))
        combos = list(itertools.product(*(grid[policy][name] for name in names))) if names else [()]
        policy_seeds = seeds if policy == "random" else [0]
        for combo, seed, capacity in itertools.product(combos, policy_seeds, slots):
            configs.append(SimConfig(policy, capacity, dict(zip(names, combo)), seed))
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
    hardware: Hardware | None = None,
    model: ModelShape | None = None,
) -> tuple[list[ReportRow], list[SkippedCapacity]]:
    """Simulate every policy at every feasible capacity; return report rows and skipped capacities.

    Capacities may be `Capacity` objects or their text form ("0.05" is a fraction, "96" a slot count).
    Rows come in the order of `policies`, then by capacity. With `hardware` (and `model`, by default the
    preset matching the trace), each row also gets its timing and Belady's timing. That records every
    configuration's per-step events, which takes T x L x R x 5 bytes per configuration.
    """
    if hardware is not None and model is None:
        model = model_shape_for(trace, None)
    parsed = [c if isinstance(c, Capacity) else Capacity.parse(str(c)) for c in capacities]
    unselected = sorted(set(grid or {}) - set(policies))
    if unselected:
        raise ValueError(f"hyper-parameter grid for {unselected}, which are not among the policies {list(policies)}")
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

    configs = build_configs(policies, slots, grid or {}, seeds)
    bound_configs = [SimConfig(BOUND_POLICY, count) for count in slots]
    requested_configs = list(dict.fromkeys(configs + bound_configs))
    results = {}
    groups = list(dict.fromkeys(config.policy for config in requested_configs))
    timings: dict[SimConfig, TimingResult] = {}
    for name in tqdm(groups, desc="policies", unit="policy", disable=not progress or not requested_configs):
        group = [config for config in requested_configs if config.policy == name]
        if hardware is None:
            group_results = run_sweep(requests, group, scope=scope, num_experts=trace.num_experts, unroll=unroll)
        else:
            group_results, events = run_sweep(
                requests, group, scope=scope, num_experts=trace.num_experts, unroll=unroll, record_events=True
            )
            for config in group:
                timings[config] = estimate_timing(trace, events[config], hardware, model)
        results.update(zip(group, group_results))

    total_experts = trace.num_layers * trace.num_experts
    bound = {config.capacity: results[config].hit_rate for config in bound_configs}
    bound_timing = {config.capacity: timings.get(config) for config in bound_configs}
    rows = [
        ReportRow(
            trace.name, results[config], total_experts, bound[config.capacity],
            timing=timings.get(config), belady_timing=bound_timing[config.capacity],
        )
        for config in configs
    ]
    rows.sort(key=lambda row: (list(policies).index(row.result.config.policy), row.result.config.capacity))
    return rows, skipped

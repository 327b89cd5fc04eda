"""Compare an offloaded run's measured times with the timing model (`specmd_jax.timing`).

The timing model needs a `Hardware` and a `ModelShape`. The shape follows from the model's config.
The hardware's link is the emulated one. Its two compute figures (peak FLOP/s and memory bandwidth)
are fitted to a calibration run of the same settings on a free link. The roofline is written for
accelerators and has no term for the Python and dispatch overhead that dominates a small model on a
CPU. That overhead includes the host work of each transfer (the `device_put` calls, the decisions
and the slot writes), which a run with the same decisions repeats whatever the link. The fitted
figures are therefore calibration constants, not the CPU's real throughput.
"""

from __future__ import annotations

import dataclasses
import math

from specmd_jax.model.config import ModelConfig
from specmd_jax.runtime.generate import OffloadedRun
from specmd_jax.timing.estimate import TimingResult, estimate_timing
from specmd_jax.timing.hardware import Hardware
from specmd_jax.timing.models import ModelShape
from specmd_jax.timing.timeline import TRANSFER_PREFETCH

# Search range of the fitted compute figures, FLOP/s and bytes/s. A fit that ends at a bound is reported as such.
FIT_RANGE = (1e3, 1e18)
FIT_ROUNDS = 4
BISECTION_STEPS = 60


def model_shape_for(config: ModelConfig) -> ModelShape:
    """Return the timing model's `ModelShape` of a model config.

    Raises ValueError for dense layers that do not come first, which `ModelShape` cannot describe.
    """
    num_dense = len(config.dense_layers)
    if tuple(sorted(config.dense_layers)) != tuple(range(num_dense)):
        raise ValueError(
            f"the timing model needs the dense layers before the MoE layers, but this model has dense layers {config.dense_layers}"
        )
    return ModelShape(
        name=config.name, num_layers=config.num_layers, num_experts=config.num_experts, top_k=config.top_k,
        hidden=config.hidden_size, expert_ffn=config.expert_hidden_size, num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, vocab_size=config.vocab_size,
        dtype_bytes=2 if config.dtype == "bfloat16" else 4, num_dense_layers=num_dense,
        dense_ffn=config.dense_hidden_size if num_dense else 0,
        num_shared_experts=1 if config.shared_expert_hidden_size else 0,
        shared_expert_ffn=config.shared_expert_hidden_size, source=f"ModelConfig '{config.name}'",
    )


def prefetch_plan(run: OffloadedRun) -> dict[int, list[int]]:
    """Return the run's prefetches as the timing model's `PrefetchPlan`: issue step -> consumer steps, in issue order."""
    plan: dict[int, list[int]] = {}
    for transfer in run.transfers:
        if transfer.kind == TRANSFER_PREFETCH:
            plan.setdefault(transfer.issue_step, []).append(transfer.consumer_step)
    return plan


def modelled_timing(run: OffloadedRun, hardware: Hardware, shape: ModelShape) -> TimingResult:
    """Estimate the run's TTFT, TPOT and stall time with the timing model, from its own trace, outcomes and prefetches."""
    return estimate_timing(run.trace, run.outcomes(), hardware, shape, prefetches=prefetch_plan(run) or None)


@dataclasses.dataclass(frozen=True)
class ComputeFit:
    """Timing-model compute figures fitted to a calibration run on a free link.

    Attributes:
      peak_flops, memory_bandwidth: the `Hardware` compute figures that reproduce the run's pass times.
      ttft, tpot: the modelled TTFT and TPOT of the calibration run with these figures, seconds.
      at_bound: whether a figure ended at the edge of `FIT_RANGE` (the fit could not reach its target).
    """

    peak_flops: float
    memory_bandwidth: float
    ttft: float | None
    tpot: float | None
    at_bound: bool

    def hardware(self, link_bandwidth: float, link_latency: float = 0.0, name: str = "cpu-fitted") -> Hardware:
        """Build the `Hardware` of an emulated link from the fitted compute figures."""
        return Hardware(
            name=name, peak_flops=self.peak_flops, memory_bandwidth=self.memory_bandwidth,
            link_bandwidth=link_bandwidth, transfer_latency=link_latency,
            source="compute figures fitted to a free-link calibration run; link emulated",
        )


def _bisect_log(function, target: float) -> float:
    """Find x in FIT_RANGE with function(x) = target for a non-increasing function, in log space."""
    low, high = math.log(FIT_RANGE[0]), math.log(FIT_RANGE[1])
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        if function(math.exp(middle)) > target:
            low = middle
        else:
            high = middle
    return math.exp((low + high) / 2)


def fit_compute(calibration: OffloadedRun, shape: ModelShape) -> ComputeFit:
    """Fit the timing model's compute figures to the pass times of a run on a free link.

    The memory bandwidth is fitted to the mean decode pass and the peak FLOP/s to the TTFT, in turn.
    A one-token decode pass is memory-bound, and a prefill is compute-bound at a low enough peak.
    Without a decode pass the bandwidth is fitted to the total time instead.
    """
    if calibration.link_bandwidth is not None:
        raise ValueError("calibration run: expected a run on a free link (no emulated bandwidth), so its transfer costs are the host's own")
    outcomes = calibration.outcomes()
    target_ttft, target_tpot = calibration.ttft, calibration.tpot
    total = float(calibration.pass_time.sum())

    def timed(peak: float, bandwidth: float):
        hardware = Hardware(name="fit", peak_flops=peak, memory_bandwidth=bandwidth, link_bandwidth=math.inf, transfer_latency=0.0)
        return estimate_timing(calibration.trace, outcomes, hardware, shape).timed

    peak, bandwidth = FIT_RANGE[1], FIT_RANGE[1]
    for _ in range(FIT_ROUNDS):
        if target_tpot is not None:
            bandwidth = _bisect_log(lambda b: timed(peak, b).tpot, target_tpot)
        else:
            bandwidth = _bisect_log(lambda b: timed(peak, b).total_time, total)
        if target_ttft is not None:
            peak = _bisect_log(lambda p: timed(p, bandwidth).ttft, target_ttft)
    result = timed(peak, bandwidth)
    at_bound = any(math.isclose(value, bound, rel_tol=1e-3) for value in (peak, bandwidth) for bound in FIT_RANGE)
    return ComputeFit(peak, bandwidth, result.ttft, result.tpot, at_bound)


def relative_error(modelled: float | None, measured: float | None) -> float | None:
    """(modelled - measured) / measured, or None when either is missing or measured is 0."""
    if modelled is None or measured is None or measured == 0:
        return None
    return (modelled - measured) / measured


def comparison_rows(run: OffloadedRun, modelled: TimingResult) -> list[tuple[str, float | None, float | None, float | None]]:
    """(quantity, measured seconds, modelled seconds, relative error) for TTFT, TPOT and stall time."""
    rows = []
    for name, measured, estimate in (
        ("TTFT", run.ttft, modelled.ttft),
        ("TPOT", run.tpot, modelled.tpot),
        ("stall", run.total_stall, modelled.total_stall),
    ):
        rows.append((name, measured, estimate, relative_error(estimate, measured)))
    return rows


def describe_outcomes(run: OffloadedRun) -> str:
    """Summarize the run's requests, hits, transfers and bytes in one line."""
    demand = sum(1 for t in run.transfers if t.kind != TRANSFER_PREFETCH)
    prefetches = len(run.transfers) - demand
    return (
        f"requests {run.requests}, hits {run.hits} (hit rate {run.hit_rate:.3f}), transfers {len(run.transfers)} "
        f"({demand} demand, {prefetches} prefetch), {run.bytes_moved} bytes moved"
    )

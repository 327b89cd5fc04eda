"""Reports of a sweep: the printed table and the CSV file."""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Sequence

from specmd_jax.sim.sweep import SimResult
from specmd_jax.timing import TimingResult

CSV_COLUMNS = (
    "trace",
    "policy",
    "scope",
    "capacity_experts",
    "capacity_fraction",
    "capacity_effective",
    "requests",
    "hits",
    "hit_rate",
    "compulsory_misses",
    "capacity_misses",
    "collision_misses",
    "evictions",
    "seed",
    "belady_hit_rate",
    "hit_rate_per_layer",
    "hardware",
    "model_shape",
    "ttft_s",
    "tpot_s",
    "stall_s",
    "belady_tpot_s",
    "all_resident_tpot_s",
    "no_cache_tpot_s",
    "prefetcher",
    "miss_mode",
    "prefetches",
    "prefetch_hits",
    "wasted_prefetches",
    "prefetch_precision",
    "prefetch_recall",
    "bound_hit_rate",
    "late_prefetches",
    "demand_bytes",
    "prefetch_bytes",
    "oracle_belady_tpot_s",
    "lru_tpot_s",
    "tpot_reduction_vs_lru",
    "tpot_reduction_vs_no_cache",
    "substitutions",
)
"""CSV columns (documented in docs/report.md). The timing ones are empty unless a hardware preset was
given, and `bound_*` unless a prefetcher was swept."""


@dataclasses.dataclass(frozen=True)
class ReportRow:
    """One simulated configuration, with the Belady bound at the same capacity and scope."""

    trace: str
    result: SimResult
    total_experts: int  # L * E of the trace
    belady_hit_rate: float
    timing: TimingResult | None = None
    belady_timing: TimingResult | None = None
    bound: SimResult | None = None  # oracle prefetching with Belady eviction at the same capacity
    bound_timing: TimingResult | None = None
    baseline_timing: TimingResult | None = None  # LRU without prefetching at the same capacity

    @property
    def capacity_fraction(self) -> float:
        return self.result.config.capacity / self.total_experts

    @property
    def prefetcher(self) -> str:
        prefetch = self.result.config.prefetch
        return "none" if prefetch is None else prefetch.label

    @property
    def tpot_reduction_vs_lru(self) -> float | None:
        """1 - TPOT / TPOT of LRU without prefetching; None without timing or TPOT."""
        return _reduction(self.timing.tpot if self.timing else None, self.baseline_timing.tpot if self.baseline_timing else None)

    @property
    def tpot_reduction_vs_no_cache(self) -> float | None:
        """1 - TPOT / TPOT with every requested expert transferred; None without timing or TPOT."""
        return _reduction(self.timing.tpot if self.timing else None, self.timing.no_cache.tpot if self.timing else None)


def _reduction(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference <= 0:
        return None
    return 1.0 - value / reference


@dataclasses.dataclass(frozen=True)
class SkippedCapacity:
    capacity: str
    reason: str


def _format_rate(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def _milliseconds(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.3f}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}%"


def _optional(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def _rate_or_empty(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6f}"


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.9g}"


def _timing_cells(row: ReportRow) -> tuple[str, ...]:
    timing, bound = row.timing, row.belady_timing
    return (
        _milliseconds(timing.ttft),
        _milliseconds(timing.tpot),
        f"{timing.total_stall:.3f}",
        _milliseconds(bound.tpot if bound else None),
        _milliseconds(timing.all_resident.tpot),
        _milliseconds(timing.no_cache.tpot),
    )


def format_table(rows: Sequence[ReportRow], skipped: Sequence[SkippedCapacity] = ()) -> str:
    """Render rows (policy x capacity) as an aligned plain-text table, then the skipped capacities.

    `slots` is the capacity as given and `used` the slots simulated: in per-layer scope each layer gets
    floor(C / L) of them, so `used` can be smaller.
    """
    header = ("policy", "slots", "fraction", "used", "hit_rate", "compulsory", "capacity", "collision", "belady_bound")
    timed = bool(rows) and all(row.timing is not None for row in rows)
    prefetched = any(row.result.config.prefetch is not None or row.result.config.miss != "demand" for row in rows)
    bounded = any(row.bound is not None for row in rows)
    if prefetched:
        header = header[:1] + ("prefetch",) + header[1:] + ("prefetches", "pf_hits", "wasted", "precision", "recall")
    substituted = any(row.result.config.miss == "substitute" for row in rows)
    if substituted:
        header += ("substituted",)
    if bounded:
        header += ("bound",)
    several_hardware = timed and len({row.timing.hardware.name for row in rows}) > 1
    if several_hardware:
        header = ("hardware",) + header
    if timed:
        header += ("ttft_ms", "tpot_ms", "stall_s", "belady_tpot_ms", "resident_tpot_ms", "no_cache_tpot_ms")
        if prefetched:
            header += ("late", "oracle_belady_tpot_ms", "vs_lru", "vs_no_cache")
    lines = [header]
    for row in rows:
        result = row.result
        policy_cell = (row.timing.hardware.name,) if several_hardware else ()
        policy_cell += (
            result.config.label if result.config.policy != "random" else f"{result.config.label}[seed={result.config.seed}]",
        )
        if prefetched:
            miss = "" if result.config.miss == "demand" else f" [{result.config.miss} misses]"
            policy_cell += (row.prefetcher + miss,)
        cells = policy_cell + (
            str(result.config.capacity),
            f"{row.capacity_fraction:.4f}",
            str(result.effective_capacity),
            _format_rate(result.hit_rate),
            str(result.compulsory_misses),
            str(result.capacity_misses),
            str(result.collision_misses),
            _format_rate(row.belady_hit_rate),
        )
        if prefetched:
            if result.config.prefetch is None:
                cells += ("-", "-", "-", "-", "-")
            else:
                cells += (
                    str(result.prefetches), str(result.prefetch_hits), str(result.wasted_prefetches),
                    _format_rate(result.prefetch_precision), _format_rate(result.prefetch_recall),
                )
        if substituted:
            cells += (str(result.substitutions),)
        if bounded:
            cells += (_format_rate(row.bound.hit_rate) if row.bound else "n/a",)
        if timed:
            cells += _timing_cells(row)
            if prefetched:
                cells += (
                    str(row.timing.late_prefetches),
                    _milliseconds(row.bound_timing.tpot if row.bound_timing else None),
                    _percent(row.tpot_reduction_vs_lru),
                    _percent(row.tpot_reduction_vs_no_cache),
                )
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in enumerate(zip(line, widths)))
        for line in lines
    ]
    text.insert(1, "  ".join("-" * width for width in widths))
    for item in skipped:
        text.append(f"skipped capacity {item.capacity}: {item.reason}")
    if bounded:
        text.append(
            "bound: hit rate of oracle prefetching with Belady eviction at the same capacity (an upper bound on hit "
            "rate; its TPOT, oracle_belady_tpot_ms, is not a bound on TPOT)"
        )
    if timed:
        first = rows[0].timing
        hardware_names = ", ".join(dict.fromkeys(row.timing.hardware.name for row in rows))
        text.append(f"timing: hardware {hardware_names}, model {first.model.name}; ms per token, stall in seconds over the trace")
        if prefetched:
            text.append("vs_lru, vs_no_cache: TPOT reduction against LRU without prefetching and against no cache")
        if first.note:
            text.append(f"timing note: {first.note}")
    return "\n".join(text)


def write_csv(rows: Sequence[ReportRow], path: str | os.PathLike) -> None:
    """Write one CSV line per row with the columns of `CSV_COLUMNS`."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            result = row.result
            writer.writerow([
                row.trace,
                result.config.label,
                result.scope,
                result.config.capacity,
                f"{row.capacity_fraction:.6f}",
                result.effective_capacity,
                result.requests,
                result.hits,
                f"{result.hit_rate:.6f}",
                result.compulsory_misses,
                result.capacity_misses,
                result.collision_misses,
                result.evictions,
                result.config.seed,
                f"{row.belady_hit_rate:.6f}",
                ";".join(f"{rate:.6f}" for rate in result.hit_rate_per_layer),
                *_timing_csv(row),
                *_prefetch_csv(row),
            ])


def _timing_csv(row: ReportRow) -> list[str]:
    timing, bound = row.timing, row.belady_timing
    if timing is None:
        return [""] * 8
    return [
        timing.hardware.name,
        timing.model.name,
        _seconds(timing.ttft),
        _seconds(timing.tpot),
        _seconds(timing.total_stall),
        _seconds(bound.tpot if bound else None),
        _seconds(timing.all_resident.tpot),
        _seconds(timing.no_cache.tpot),
    ]


def _prefetch_csv(row: ReportRow) -> list:
    result, timing = row.result, row.timing
    cells = [
        row.prefetcher,
        result.config.miss,
        result.prefetches,
        result.prefetch_hits,
        result.wasted_prefetches,
        _rate_or_empty(result.prefetch_precision),
        _rate_or_empty(result.prefetch_recall) if result.config.prefetch is not None else "",
        f"{row.bound.hit_rate:.6f}" if row.bound else "",
    ]
    if timing is None:
        return cells + [""] * 7 + [result.substitutions]
    return cells + [
        timing.late_prefetches,
        timing.demand_bytes,
        timing.prefetch_bytes,
        _seconds(row.bound_timing.tpot if row.bound_timing else None),
        _seconds(row.baseline_timing.tpot if row.baseline_timing else None),
        _optional(row.tpot_reduction_vs_lru),
        _optional(row.tpot_reduction_vs_no_cache),
        result.substitutions,
    ]

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
)
"""CSV columns; the timing ones (from `hardware` on) are empty unless a hardware preset was given."""


@dataclasses.dataclass(frozen=True)
class ReportRow:
    """One simulated configuration, with the Belady bound at the same capacity and scope."""

    trace: str
    result: SimResult
    total_experts: int  # L * E of the trace
    belady_hit_rate: float
    timing: TimingResult | None = None
    belady_timing: TimingResult | None = None

    @property
    def capacity_fraction(self) -> float:
        return self.result.config.capacity / self.total_experts


@dataclasses.dataclass(frozen=True)
class SkippedCapacity:
    capacity: str
    reason: str


def _format_rate(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def _milliseconds(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.3f}"


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
    if timed:
        header += ("ttft_ms", "tpot_ms", "stall_s", "belady_tpot_ms", "resident_tpot_ms", "no_cache_tpot_ms")
    lines = [header]
    for row in rows:
        result = row.result
        cells = (
            result.config.label if result.config.policy != "random" else f"{result.config.label}[seed={result.config.seed}]",
            str(result.config.capacity),
            f"{row.capacity_fraction:.4f}",
            str(result.effective_capacity),
            _format_rate(result.hit_rate),
            str(result.compulsory_misses),
            str(result.capacity_misses),
            str(result.collision_misses),
            _format_rate(row.belady_hit_rate),
        )
        lines.append(cells + (_timing_cells(row) if timed else ()))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in enumerate(zip(line, widths)))
        for line in lines
    ]
    text.insert(1, "  ".join("-" * width for width in widths))
    for item in skipped:
        text.append(f"skipped capacity {item.capacity}: {item.reason}")
    if timed:
        first = rows[0].timing
        text.append(f"timing: hardware {first.hardware.name}, model {first.model.name}; ms per token, stall in seconds over the trace")
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

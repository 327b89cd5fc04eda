"""Reports of a sweep: the printed table and the CSV file."""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Sequence

from specmd_jax.sim.sweep import SimResult

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
)


@dataclasses.dataclass(frozen=True)
class ReportRow:
    """One simulated configuration, with the Belady bound at the same capacity and scope."""

    trace: str
    result: SimResult
    total_experts: int  # L * E of the trace
    belady_hit_rate: float

    @property
    def capacity_fraction(self) -> float:
        return self.result.config.capacity / self.total_experts


@dataclasses.dataclass(frozen=True)
class SkippedCapacity:
    capacity: str
    reason: str


def _format_rate(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def format_table(rows: Sequence[ReportRow], skipped: Sequence[SkippedCapacity] = ()) -> str:
    """Render rows (policy x capacity) as an aligned plain-text table, then the skipped capacities.

    `slots` is the capacity as given and `used` the slots simulated: in per-layer scope each layer gets
    floor(C / L) of them, so `used` can be smaller.
    """
    header = ("policy", "slots", "fraction", "used", "hit_rate", "compulsory", "capacity", "collision", "belady_bound")
    lines = [header]
    for row in rows:
        result = row.result
        lines.append((
            result.config.label if result.config.policy != "random" else f"{result.config.label}[seed={result.config.seed}]",
            str(result.config.capacity),
            f"{row.capacity_fraction:.4f}",
            str(result.effective_capacity),
            _format_rate(result.hit_rate),
            str(result.compulsory_misses),
            str(result.capacity_misses),
            str(result.collision_misses),
            _format_rate(row.belady_hit_rate),
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in enumerate(zip(line, widths)))
        for line in lines
    ]
    text.insert(1, "  ".join("-" * width for width in widths))
    for item in skipped:
        text.append(f"skipped capacity {item.capacity}: {item.reason}")
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
            ])

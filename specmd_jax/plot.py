"""PNG plots of a study: hit rate, and TPOT when timed, against capacity, one line per policy and prefetcher."""

from __future__ import annotations

import os
from collections.abc import Sequence

from specmd_jax.report import ReportRow


def _series_label(row: ReportRow) -> str:
    config = row.result.config
    label = config.label if config.policy != "random" else f"{config.label}[seed={config.seed}]"
    if config.prefetch is not None:
        label += f" + {row.prefetcher}"
    if config.miss != "demand":
        label += f" ({config.miss} misses)"
    return label


def plot_rows(rows: Sequence[ReportRow], path: str | os.PathLike) -> None:
    """Write the plot of `rows` to `path` (PNG); raise ValueError when there are no rows.

    With several hardware presets, the hit-rate panel uses the rows of the first one (hit rates do not
    depend on the hardware) and the TPOT panel draws one line per series and preset.
    """
    if not rows:
        raise ValueError("no rows to plot")
    if not str(path).lower().endswith(".png"):
        raise ValueError(f"invalid plot path '{path}': expected a file name ending in .png")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hardware_names = list(dict.fromkeys(row.timing.hardware.name for row in rows if row.timing is not None))
    series: dict[tuple[str, str | None], list[ReportRow]] = {}
    for row in rows:
        hardware = row.timing.hardware.name if row.timing is not None else None
        series.setdefault((_series_label(row), hardware), []).append(row)
    # Colour by prefetcher, line style and marker by eviction policy, so series stay apart.
    prefetchers = list(dict.fromkeys(row.prefetcher for row in rows))
    policies = list(dict.fromkeys(row.result.config.policy for row in rows))
    colours = plt.get_cmap("tab10").colors
    styles = ("-", "--", ":", "-.")
    markers = ("o", "s", "^", "D", "v", "P", "X", "*")

    timed = all(row.timing is not None and row.timing.tpot is not None for row in rows)
    panels = 2 if timed else 1
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels + 3.5, 4.5), squeeze=False)
    hit_axis = axes[0][0]
    for (label, hardware), points in series.items():
        points = sorted(points, key=lambda row: row.result.config.capacity)
        fractions = [row.capacity_fraction for row in points]
        policy_index = policies.index(points[0].result.config.policy)
        style = {
            "color": colours[prefetchers.index(points[0].prefetcher) % len(colours)],
            "linestyle": styles[policy_index % len(styles)],
            "marker": markers[policy_index % len(markers)],
        }
        first_hardware = hardware is None or hardware == hardware_names[0]
        if first_hardware:
            hit_axis.plot(fractions, [row.result.hit_rate for row in points], label=label, **style)
        if timed:
            if len(hardware_names) > 1:
                # Presets differ by marker fill: filled for the first, hollow for the others.
                style["markerfacecolor"] = style["color"] if first_hardware else "none"
                label = f"{label} [{hardware}]"
            axes[0][1].plot(fractions, [row.timing.tpot * 1e3 for row in points], label=label, **style)

    bound_points = sorted({(row.capacity_fraction, row.bound.hit_rate) for row in rows if row.bound is not None})
    if bound_points:
        hit_axis.plot(*zip(*bound_points), linestyle="--", color="black", label="bound: oracle prefetch + Belady")
    hit_axis.set_xlabel("capacity (fraction of all experts)")
    hit_axis.set_ylabel("hit rate")
    hit_axis.set_title(rows[0].trace)
    if timed:
        tpot_axis = axes[0][1]
        timing = rows[0].timing
        tpot_axis.set_xlabel("capacity (fraction of all experts)")
        tpot_axis.set_ylabel("TPOT (ms)")
        tpot_axis.set_title(f"{', '.join(hardware_names)}; {timing.model.name}")
    hit_axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0) if not timed else None)
    if timed:
        axes[0][1].legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)

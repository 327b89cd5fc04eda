"""The prefetch policies: a score table source and a selection rule each (see specmd_jax.sim.prefetch)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from specmd_jax.prefetch import sources
from specmd_jax.traces.trace import Trace

DEFAULT_THRESHOLD = 0.9
DEFAULT_TRAIN_FRACTION = 0.25


@dataclasses.dataclass(frozen=True)
class Prefetcher:
    """One prefetch policy: where its scores come from and how candidates are chosen from them."""

    name: str
    source: str  # oracle, previous-pass, frequency, co-occurrence, gate-speculative or learned
    selection: str  # all, top-k or mass
    description: str
    trained: bool = False  # whether its table is estimated on the trace's first passes


PREFETCHERS: dict[str, Prefetcher] = {
    prefetcher.name: prefetcher
    for prefetcher in (
        Prefetcher("oracle", "oracle", "all", "the true experts of the next steps (an upper bound)"),
        Prefetcher("top-k", "frequency", "top-k", "fixed top-k: the k most popular experts of each target layer", True),
        Prefetcher(
            "score", "co-occurrence", "mass",
            "the fewest co-occurrence candidates whose predicted probability mass reaches the threshold", True,
        ),
        Prefetcher("previous-pass", "previous-pass", "all", "the experts the target layer used in the previous pass"),
        Prefetcher(
            "co-occurrence", "co-occurrence", "top-k",
            "the k most likely experts under a layer-to-layer transition table", True,
        ),
        Prefetcher(
            "gate-speculative", "gate-speculative", "top-k",
            "the next layer's router applied to the current hidden state (the trace's speculative logits)",
        ),
        Prefetcher("learned", "learned", "top-k", "the k best experts of a learned predictor's score table"),
    )
}
PREFETCHER_NAMES = ("none",) + tuple(PREFETCHERS)


@dataclasses.dataclass(frozen=True)
class PrefetchConfig:
    """A prefetcher with its parameters; None means the default that `resolve` fills in.

    Attributes:
      name: a key of PREFETCHERS.
      lookahead: target layers per step (l + 1 .. l + lookahead, wrapping into the next pass).
      top_k: experts per target layer for the `top-k` selection; None = the trace's top-k.
      threshold: probability mass per target layer for the `mass` selection, in (0, 1].
      budget: the maximum prefetches per step; None = no limit.
    """

    name: str
    lookahead: int = 1
    top_k: int | None = None
    threshold: float = DEFAULT_THRESHOLD
    budget: int | None = None

    def __post_init__(self):
        if self.name not in PREFETCHERS:
            raise ValueError(f"unknown prefetcher '{self.name}'; expected one of {', '.join(PREFETCHERS)}")
        _check_int("lookahead", self.lookahead, 1)
        if self.top_k is not None:
            _check_int("top_k", self.top_k, 1)
        if self.budget is not None:
            _check_int("budget", self.budget, 0)
        threshold = self.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise ValueError(f"PrefetchConfig.threshold: expected a number in (0, 1], got {threshold!r}")

    @property
    def prefetcher(self) -> Prefetcher:
        return PREFETCHERS[self.name]

    @property
    def label(self) -> str:
        """Name with the parameters that its selection uses, e.g. "co-occurrence(k=2,d=1)"."""
        parts = []
        selection = self.prefetcher.selection
        if selection == "top-k" and self.top_k is not None:
            parts.append(f"k={self.top_k}")
        if selection == "mass":
            parts.append(f"mass={self.threshold:g}")
        if self.lookahead != 1:
            parts.append(f"d={self.lookahead}")
        if self.budget is not None:
            parts.append(f"budget={self.budget}")
        return f"{self.name}({','.join(parts)})" if parts else self.name


def _check_int(field: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"PrefetchConfig.{field}: expected an integer >= {low}, got {value!r}")


def build_score_table(
    trace: Trace,
    presence: np.ndarray,
    prefetcher: Prefetcher,
    lookahead: int,
    *,
    train_fraction: float = DEFAULT_TRAIN_FRACTION,
    score_tables: Mapping[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Return the float32 [T, L, D, E] score table of `prefetcher` on `trace` (D = lookahead).

    `score_tables` supplies tables by prefetcher name; it is required for `learned` and overrides the
    built-in source of any other prefetcher. A supplied table may have more lookahead rows than needed.
    """
    check_score_tables(score_tables)
    supplied = (score_tables or {}).get(prefetcher.name)
    if supplied is not None:
        return _check_supplied(supplied, prefetcher.name, trace, lookahead)
    if prefetcher.source == "learned":
        raise ValueError(
            "prefetcher 'learned' needs a score table: pass score_tables={'learned': table} with the "
            "predictor's table (specmd_jax.predictor), float32 [T, L, D, E]"
        )
    if prefetcher.source == "oracle":
        return sources.oracle_scores(presence, lookahead)
    if prefetcher.source == "previous-pass":
        return sources.previous_pass_scores(presence, lookahead)
    if prefetcher.source == "gate-speculative":
        return sources.gate_speculative_scores(trace, lookahead)
    train_passes = sources.train_pass_count(trace.num_passes, train_fraction)
    if prefetcher.source == "frequency":
        return sources.frequency_scores(presence, lookahead, train_passes)
    if prefetcher.source == "co-occurrence":
        return sources.cooccurrence_scores(presence, lookahead, train_passes)
    raise ValueError(f"prefetcher '{prefetcher.name}' has an unknown score source '{prefetcher.source}'")


def check_score_tables(score_tables) -> None:
    """Raise ValueError unless `score_tables` is None or a mapping from prefetcher names to arrays."""
    if score_tables is None:
        return
    if not isinstance(score_tables, Mapping):
        raise ValueError(
            f"score_tables: expected a mapping from prefetcher names to tables, e.g. {{'learned': table}}, "
            f"got {type(score_tables).__name__}"
        )
    unknown = sorted(str(name) for name in score_tables if name not in PREFETCHERS)
    if unknown:
        raise ValueError(f"score_tables: unknown prefetcher names {unknown}; expected names from {', '.join(PREFETCHERS)}")


def _check_supplied(table, name: str, trace: Trace, lookahead: int) -> np.ndarray:
    if not isinstance(table, np.ndarray) or table.dtype.kind not in "fiu":
        kind = f"dtype {table.dtype}" if isinstance(table, np.ndarray) else type(table).__name__
        raise ValueError(f"score table '{name}': expected a numpy array of real numbers, got {kind}")
    expected = (trace.num_passes, trace.num_layers, trace.num_experts)
    if table.ndim != 4 or (table.shape[0], table.shape[1], table.shape[3]) != expected:
        raise ValueError(
            f"score table '{name}': expected shape ({expected[0]}, {expected[1]}, D, {expected[2]}) for trace "
            f"'{trace.metadata.model}', got {table.shape}"
        )
    if table.shape[2] < lookahead:
        raise ValueError(f"score table '{name}': has {table.shape[2]} lookahead rows, but lookahead {lookahead} needs that many")
    table = table[:, :, :lookahead]
    float32_max = float(np.finfo(np.float32).max)
    bad = ~np.isfinite(table) | (table < 0) | (table > float32_max)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"score table '{name}': expected finite scores in [0, {float32_max:.3g}] (float32), got {table[index]} at index {index}"
        )
    return table.astype(np.float32)


def resolved_params(config: PrefetchConfig, trace_top_k: int, num_experts: int) -> tuple[int, float, int]:
    """Return (top_k, threshold, budget) with the defaults filled in.

    A step has at most lookahead x E candidates, so no budget (None) and every larger budget become
    exactly that. The simulator's candidate list has this length.
    """
    if config.top_k is not None and config.top_k > num_experts:
        raise ValueError(f"PrefetchConfig.top_k: expected at most {num_experts} (the experts per layer), got {config.top_k}")
    top_k = trace_top_k if config.top_k is None else config.top_k
    most = config.lookahead * num_experts
    budget = most if config.budget is None else min(config.budget, most)
    return top_k, float(config.threshold), budget

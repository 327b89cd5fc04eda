"""Accuracy of score tables per layer pair: the learned predictor against the free baselines.

Every method is a score table in the format of `specmd_jax.prefetch.sources` ([T, L, D, E]). For an
issuing step s and offset j with target request set Y (|Y| >= 1), the experts are ranked by score,
ties to the smaller expert id, and with k the trace's top-k:
  recall@k = |top-k ∩ Y| / |Y|, precision@k = |top-k ∩ Y| / k, F1@k from those two,
  top-1 = 1 when the best-scored expert is in Y, recall@2k = |top-2k ∩ Y| / |Y|.
Each metric is averaged over the evaluated issuing steps of each (layer l, offset j) pair.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from specmd_jax.predictor.features import StepTargets
from specmd_jax.prefetch import sources
from specmd_jax.sim.requests import request_presence
from specmd_jax.traces.trace import Trace

METRICS = ("recall@k", "precision@k", "f1@k", "top-1", "recall@2k")

LEARNED = "learned"
BASELINES = ("current-layer", "co-occurrence", "frequency", "previous-pass", "gate-speculative")


@dataclasses.dataclass(frozen=True)
class PairMetrics:
    """Metrics of one score table per layer pair.

    Attributes:
      values: metric name (from `METRICS`) -> float64 [L, D], the mean over evaluated steps; NaN where
        a pair has no evaluated step.
      steps: int64 [L, D], evaluated issuing steps of each pair.
    """

    values: dict[str, np.ndarray]
    steps: np.ndarray

    def mean(self, metric: str, pairs: np.ndarray) -> float:
        """Return the step-weighted mean of `metric` over the pairs where `pairs` (bool [L, D]) is True."""
        weights = np.where(pairs, self.steps, 0)
        if weights.sum() == 0:
            return float("nan")
        return float(np.nansum(self.values[metric] * weights) / weights.sum())


def ranking_metrics(scores: np.ndarray, requests: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Return every metric of `METRICS` per row of `scores` [..., E] against 0/1 `requests` [..., E]."""
    num_experts = scores.shape[-1]
    order = np.argsort(-scores, axis=-1, kind="stable")[..., : min(2 * k, num_experts)]
    hits = np.take_along_axis(requests, order, axis=-1) > 0
    wanted = np.maximum(requests.sum(axis=-1), 1)
    hits_k = hits[..., :k].sum(axis=-1)
    recall = hits_k / wanted
    precision = hits_k / k
    sums = recall + precision
    f1 = np.divide(2 * recall * precision, sums, out=np.zeros_like(sums, dtype=np.float64), where=sums > 0)
    return {
        "recall@k": recall,
        "precision@k": precision,
        "f1@k": f1,
        "top-1": hits[..., 0].astype(np.float64),
        "recall@2k": hits.sum(axis=-1) / wanted,
    }


def table_metrics(table: np.ndarray, targets: StepTargets, k: int, first_pass: int, end_pass: int) -> PairMetrics:
    """Score `table` on the steps issued in passes [first_pass, end_pass) whose targets lie before end_pass."""
    if table.shape != targets.requests.shape:
        raise ValueError(f"score table: expected shape {targets.requests.shape} (T, L, D, E), got {table.shape}")
    valid = targets.valid_before(end_pass)[first_pass:end_pass]
    per_row = ranking_metrics(table[first_pass:end_pass], targets.requests[first_pass:end_pass], k)
    steps = valid.sum(axis=0)
    values = {}
    for name, rows in per_row.items():
        totals = np.where(valid, rows, 0.0).sum(axis=0)
        values[name] = np.divide(totals, steps, out=np.full(steps.shape, np.nan), where=steps > 0)
    return PairMetrics(values=values, steps=steps.astype(np.int64))


def mean_recall(table: np.ndarray, targets: StepTargets, k: int, first_pass: int, end_pass: int) -> float:
    """Return recall@k averaged over every evaluated step of [first_pass, end_pass) (the validation score)."""
    metrics = table_metrics(table, targets, k, first_pass, end_pass)
    return metrics.mean("recall@k", np.ones(metrics.steps.shape, dtype=bool))


def baseline_tables(trace: Trace, lookahead: int, train_passes: int) -> dict[str, np.ndarray]:
    """Build the free baselines' score tables, estimated on passes < train_passes where they need data.

    Gate-speculative is included only when the trace has speculative logits.
    """
    presence = request_presence(trace)
    tables = {
        "current-layer": sources.current_layer_scores(presence, lookahead),
        "co-occurrence": sources.cooccurrence_scores(presence, lookahead, train_passes),
        "frequency": sources.frequency_scores(presence, lookahead, train_passes),
        "previous-pass": sources.previous_pass_scores(presence, lookahead),
    }
    if trace.speculative_logits is not None:
        tables["gate-speculative"] = sources.gate_speculative_scores(trace, lookahead)
    return tables


@dataclasses.dataclass(frozen=True)
class EvaluationReport:
    """Metrics of every method on the test passes [first_pass, num_passes) of one trace."""

    trace_name: str
    first_pass: int
    num_passes: int
    num_layers: int
    k: int
    methods: dict[str, PairMetrics]

    @property
    def same_pass_pairs(self) -> np.ndarray:
        """bool [L, D]: True where the target layer l + j lies in the issuing pass."""
        steps = self.methods[next(iter(self.methods))].steps
        layers, lookahead = steps.shape
        return (np.arange(layers)[:, None] + np.arange(1, lookahead + 1)[None, :]) < layers

    def best_baseline(self, metric: str = "recall@k") -> np.ndarray:
        """Return float64 [L, D], the best baseline value of `metric` at each pair."""
        values = [metrics.values[metric] for name, metrics in self.methods.items() if name != LEARNED]
        return np.nanmax(np.stack(values), axis=0)

    def learned_wins(self, metric: str = "recall@k") -> np.ndarray:
        """Return bool [L, D]: True where the learned predictor beats every baseline at `metric`."""
        return self.methods[LEARNED].values[metric] > self.best_baseline(metric)


def evaluate_tables(
    trace: Trace, learned: np.ndarray, targets: StepTargets, first_pass: int, train_passes: int
) -> EvaluationReport:
    """Compare the learned table with every baseline on passes [first_pass, T).

    `train_passes` bounds the passes the baselines may estimate from (the learned predictor's train and
    validation passes).
    """
    lookahead = targets.requests.shape[2]
    tables = {LEARNED: learned, **baseline_tables(trace, lookahead, train_passes)}
    methods = {
        name: table_metrics(table, targets, trace.top_k, first_pass, trace.num_passes) for name, table in tables.items()
    }
    return EvaluationReport(
        trace_name=trace.name, first_pass=first_pass, num_passes=trace.num_passes,
        num_layers=trace.num_layers, k=trace.top_k, methods=methods,
    )


def _pair_label(layer: int, offset: int, num_layers: int) -> str:
    target = layer + offset
    if target < num_layers:
        return f"{layer}->{target}"
    return f"{layer}->{target - num_layers} (next pass)"


def format_report(report: EvaluationReport) -> str:
    """Format the summary table (every metric, by method) and the recall@k table per layer pair."""
    same_pass = report.same_pass_pairs
    lines = [
        f"test passes {report.first_pass}..{report.num_passes - 1} of {report.trace_name}; k = {report.k} "
        f"(the trace's top-k); ties rank the smaller expert id first",
        "",
        "mean over layer pairs within a pass (weighted by steps):",
        f"{'method':<18}" + "".join(f"{name:>12}" for name in METRICS) + f"{'recall@k next pass':>20}",
    ]
    for name, metrics in report.methods.items():
        row = "".join(f"{metrics.mean(metric, same_pass):>12.4f}" for metric in METRICS)
        lines.append(f"{name:<18}{row}{metrics.mean('recall@k', ~same_pass):>20.4f}")

    lines += ["", "recall@k per layer pair (issuing layer -> target layer):"]
    names = list(report.methods)
    lines.append(f"{'pair':<20}" + "".join(f"{name:>16}" for name in names) + f"{'learned - best':>16}")
    best = report.best_baseline()
    learned = report.methods[LEARNED].values["recall@k"] if LEARNED in report.methods else None
    layers, lookahead = best.shape
    # Pairs within a pass first, then the pairs into the next pass, each by issuing layer and offset.
    pairs = sorted(
        ((layer, offset) for layer in range(layers) for offset in range(1, lookahead + 1)),
        key=lambda pair: (not same_pass[pair[0], pair[1] - 1], pair),
    )
    for layer, offset in pairs:
        cells = "".join(f"{report.methods[name].values['recall@k'][layer, offset - 1]:>16.4f}" for name in names)
        margin = f"{learned[layer, offset - 1] - best[layer, offset - 1]:>+16.4f}" if learned is not None else ""
        lines.append(f"{_pair_label(layer, offset, layers):<20}{cells}{margin}")
    if learned is not None:
        wins = report.learned_wins()
        lines.append(
            f"learned beats the best baseline at {int(wins[same_pass].sum())} of {int(same_pass.sum())} pairs within a "
            f"pass and {int(wins[~same_pass].sum())} of {int((~same_pass).sum())} pairs into the next pass"
        )
    return "\n".join(lines)

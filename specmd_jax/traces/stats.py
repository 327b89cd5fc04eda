"""Routing statistics of a trace: popularity skew, temporal reuse, next-layer predictability, reuse distance.

Definitions (missing cells are skipped everywhere):
  load            Per layer, the request count of each expert: the number of passes whose request set
                  (distinct experts selected by any token of the pass, see docs/semantics.md) contains it.
                  For one-token decode passes this is the number of tokens that selected the expert.
  max/mean        max over experts of the load divided by its mean over all E experts (1 = uniform).
  entropy         Shannon entropy in bits of the load normalised to sum to 1; log2(E) = uniform.
  overlap         Per layer, mean over consecutive passes (q, p) of one sequence of |A ∩ B| / |A|, where
                  A is the request set of the later pass p and B that of q; pairs with an empty set are
                  skipped. Baselines: uniform k / E, and the chance overlap sum(pi^2) / sum(pi) of
                  independent passes with the layer's own per-pass request probabilities pi.
  next-layer      Per layer pair l -> l + 1, over tokens present at both layers: a lookup table maps the
                  top-1 expert at layer l to the most frequent top-1 expert at layer l + 1 among the
                  tokens with index < N // 2 (ties: the one seen first), and is scored on the other
                  tokens. An expert unseen in training predicts the majority. Baseline: always predict
                  the most frequent layer-(l + 1) top-1 of the training tokens.
  reuse distance  Per item (layer, expert), the distance in steps (p' - p) * L between consecutive
                  requests at passes p < p'. A request is never reused when no later request of its
                  item exists.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from specmd_jax.traces.trace import PASS_DECODE, PASS_PREFILL, Trace

REUSE_DISTANCE_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


@dataclasses.dataclass(frozen=True)
class TraceStats:
    """Routing statistics of one trace (see the module docstring for the definitions).

    Per-layer tuples have L entries, per-pair tuples L - 1 (pair i is layer i -> i + 1). NaN marks a value
    with no data (no requests, no consecutive passes, or no test tokens).
    """

    name: str
    synthetic: bool
    source: str
    num_passes: int
    num_prefill_passes: int
    num_decode_passes: int
    num_tokens: int
    num_sequences: int
    num_layers: int
    num_experts: int
    top_k: int
    num_missing_cells: int
    load_max_mean: tuple[float, ...]
    load_entropy_bits: tuple[float, ...]
    max_entropy_bits: float
    overlap: tuple[float, ...]
    overlap_chance: tuple[float, ...]
    overlap_uniform: float
    overlap_pairs: tuple[int, ...]
    next_layer_accuracy: tuple[float, ...]
    next_layer_majority: tuple[float, ...]
    next_layer_test_tokens: tuple[int, ...]
    num_requests: int
    never_reused_fraction: float
    reuse_distance_quantiles: dict[float, float]  # quantile -> steps
    reuse_distance_histogram: tuple[tuple[int, int, int], ...]  # (low, high, count), low <= distance <= high


def _token_pass(trace: Trace) -> np.ndarray:
    return np.repeat(np.arange(trace.num_passes), np.diff(trace.pass_offsets))


def _layer_presence(trace: Trace, token_pass: np.ndarray, layer: int) -> np.ndarray:
    """Return bool [T, E]: whether pass p requests expert e at `layer` (missing cells add nothing)."""
    presence = np.zeros((trace.num_passes, trace.num_experts), dtype=bool)
    ids = trace.expert_ids[:, layer, :].astype(np.int64)
    present = (~trace.missing[:, layer])[:, None] & (ids >= 0)
    token, slot = np.nonzero(present)
    presence[token_pass[token], ids[token, slot]] = True
    return presence


def _load_skew(counts: np.ndarray) -> tuple[float, float]:
    total = counts.sum()
    if total == 0:
        return math.nan, math.nan
    share = counts[counts > 0] / total
    return float(counts.max() / counts.mean()), float(-(share * np.log2(share)).sum())


def _overlap(presence: np.ndarray, same_sequence: np.ndarray) -> tuple[float, float, int]:
    """Mean overlap of consecutive passes of a sequence at one layer, its chance level and the pair count."""
    sizes = presence.sum(axis=1)
    later, earlier = presence[1:], presence[:-1]
    usable = same_sequence & (sizes[1:] > 0) & (sizes[:-1] > 0)
    pairs = int(usable.sum())
    nonempty = sizes > 0
    if nonempty.any():
        probability = presence[nonempty].mean(axis=0)
        chance = float((probability**2).sum() / probability.sum())
    else:
        chance = math.nan
    if pairs == 0:
        return math.nan, chance, 0
    shared = (later[usable] & earlier[usable]).sum(axis=1)
    return float((shared / sizes[1:][usable]).mean()), chance, pairs


def _most_frequent_first_seen(values: np.ndarray, num_values: int) -> int:
    """Most frequent value; ties go to the value whose first occurrence comes first."""
    counts = np.bincount(values, minlength=num_values)
    first_seen = np.full(num_values, values.shape[0])
    np.minimum.at(first_seen, values, np.arange(values.shape[0]))
    return int(np.lexsort((first_seen, -counts))[0])


def _next_layer(trace: Trace, layer: int) -> tuple[float, float, int]:
    """Top-1 lookup accuracy l -> l + 1, the majority baseline and the number of test tokens."""
    E = trace.num_experts
    present = ~trace.missing[:, layer] & ~trace.missing[:, layer + 1]
    index = np.nonzero(present)[0]
    source = trace.expert_ids[index, layer, 0].astype(np.int64)
    target = trace.expert_ids[index, layer + 1, 0].astype(np.int64)
    train = index < trace.num_tokens // 2
    test = ~train
    if not test.any() or not train.any():
        return math.nan, math.nan, int(test.sum())

    # Sort the training pairs by (source, -count, first occurrence) to pick each source's best target.
    train_source, train_target = source[train], target[train]
    pair = train_source * E + train_target
    counts = np.bincount(pair, minlength=E * E)
    first_seen = np.full(E * E, pair.shape[0])
    np.minimum.at(first_seen, pair, np.arange(pair.shape[0]))
    seen_pairs = np.nonzero(counts)[0]
    order = np.lexsort((first_seen[seen_pairs], -counts[seen_pairs], seen_pairs // E))
    ranked = seen_pairs[order]
    is_best = np.ones(ranked.shape[0], dtype=bool)
    is_best[1:] = ranked[1:] // E != ranked[:-1] // E

    majority = _most_frequent_first_seen(train_target, E)
    table = np.full(E, majority, dtype=np.int64)
    table[ranked[is_best] // E] = ranked[is_best] % E
    accuracy = float((table[source[test]] == target[test]).mean())
    majority_accuracy = float((target[test] == majority).mean())
    return accuracy, majority_accuracy, int(test.sum())


def _reuse_gap_counts(presence: np.ndarray) -> tuple[np.ndarray, int]:
    """Count, per pass gap g, consecutive requests of one expert g passes apart; also count requests."""
    by_expert = np.ascontiguousarray(presence.T)
    expert, request_pass = np.nonzero(by_expert)  # sorted by expert, then by pass
    same_item = expert[1:] == expert[:-1]
    gaps = (request_pass[1:] - request_pass[:-1])[same_item]
    return np.bincount(gaps, minlength=presence.shape[0]), int(expert.shape[0])


def _quantiles_from_counts(counts: np.ndarray, unit: int) -> dict[float, float]:
    """Quantiles of the values i * unit with multiplicities counts[i] (numpy's "inverted_cdf" method)."""
    total = int(counts.sum())
    if total == 0:
        return {}
    cumulative = np.cumsum(counts)
    result = {}
    for q in REUSE_DISTANCE_QUANTILES:
        index = int(np.searchsorted(cumulative, q * total, side="left"))
        result[q] = float(index * unit)
    return result


def _power_of_two_histogram(counts: np.ndarray, unit: int) -> tuple[tuple[int, int, int], ...]:
    """Sum counts[g] over gap bins [2^i, 2^(i+1) - 1] and report them in steps (gap * unit)."""
    bins = []
    low = 1
    last = int(np.nonzero(counts)[0].max()) if counts.any() else 0
    while low <= last:
        high = 2 * low - 1
        bins.append((low * unit, high * unit, int(counts[low : high + 1].sum())))
        low *= 2
    return tuple(bins)


def compute_stats(trace: Trace) -> TraceStats:
    """Compute the routing statistics of `trace`."""
    L, E, K = trace.num_layers, trace.num_experts, trace.top_k
    token_pass = _token_pass(trace)
    same_sequence = trace.pass_sequence[1:] == trace.pass_sequence[:-1]

    max_mean, entropy, overlap, chance, pairs = [], [], [], [], []
    gap_counts = np.zeros(trace.num_passes, dtype=np.int64)
    num_requests = 0
    for layer in range(L):
        presence = _layer_presence(trace, token_pass, layer)
        layer_max_mean, layer_entropy = _load_skew(presence.sum(axis=0))
        max_mean.append(layer_max_mean)
        entropy.append(layer_entropy)
        layer_overlap, layer_chance, layer_pairs = _overlap(presence, same_sequence)
        overlap.append(layer_overlap)
        chance.append(layer_chance)
        pairs.append(layer_pairs)
        layer_gap_counts, layer_requests = _reuse_gap_counts(presence)
        gap_counts += layer_gap_counts
        num_requests += layer_requests

    next_layer = [_next_layer(trace, layer) for layer in range(L - 1)]
    num_reused = int(gap_counts.sum())
    never_reused = (num_requests - num_reused) / num_requests if num_requests else math.nan

    return TraceStats(
        name=trace.name,
        synthetic=bool(trace.metadata.synthetic),
        source=trace.metadata.source,
        num_passes=trace.num_passes,
        num_prefill_passes=int((trace.pass_kind == PASS_PREFILL).sum()),
        num_decode_passes=int((trace.pass_kind == PASS_DECODE).sum()),
        num_tokens=trace.num_tokens,
        num_sequences=int(np.unique(trace.pass_sequence).shape[0]),
        num_layers=L,
        num_experts=E,
        top_k=K,
        num_missing_cells=trace.num_missing_cells,
        load_max_mean=tuple(max_mean),
        load_entropy_bits=tuple(entropy),
        max_entropy_bits=math.log2(E),
        overlap=tuple(overlap),
        overlap_chance=tuple(chance),
        overlap_uniform=K / E,
        overlap_pairs=tuple(pairs),
        next_layer_accuracy=tuple(item[0] for item in next_layer),
        next_layer_majority=tuple(item[1] for item in next_layer),
        next_layer_test_tokens=tuple(item[2] for item in next_layer),
        num_requests=num_requests,
        never_reused_fraction=float(never_reused),
        reuse_distance_quantiles=_quantiles_from_counts(gap_counts, L),
        reuse_distance_histogram=_power_of_two_histogram(gap_counts, L),
    )


def _json_value(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {str(key): _json_value(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return [_json_value(item) for item in value]
    return value


def stats_to_dict(stats: TraceStats) -> dict[str, Any]:
    """Convert `stats` to plain JSON types: lists for tuples, string keys, None for NaN."""
    return {field.name: _json_value(getattr(stats, field.name)) for field in dataclasses.fields(stats)}


def _number(value: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}%"


def _summary(values: tuple[float, ...], digits: int = 3) -> str:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "n/a"
    return f"{min(finite):.{digits}f}-{max(finite):.{digits}f} (mean {sum(finite) / len(finite):.{digits}f})"


def format_stats(stats: TraceStats) -> str:
    """Render `stats` as a plain-text report; a synthetic trace is labelled as such in the header."""
    total_cells = stats.num_tokens * stats.num_layers
    lines = [f"Trace: {stats.name}"]
    if stats.synthetic:
        lines.append("Data: SYNTHETIC routing from a generator, not measured on a model")
    lines += [
        f"Source: {stats.source}",
        f"Passes: {stats.num_passes} ({stats.num_prefill_passes} prefill, {stats.num_decode_passes} decode)"
        f"  tokens: {stats.num_tokens}  sequences: {stats.num_sequences}",
        f"Layers: {stats.num_layers}  experts per layer: {stats.num_experts}  top-k: {stats.top_k}"
        f"  missing cells: {stats.num_missing_cells} of {total_cells}",
        "",
        f"Popularity skew per layer (request counts; uniform: max/mean 1, entropy {stats.max_entropy_bits:.3f} bits)",
        f"  max/mean {_summary(stats.load_max_mean)}; entropy bits {_summary(stats.load_entropy_bits)}",
        "",
        f"Consecutive-pass overlap per layer (|A ∩ B| / |A|; uniform baseline k/E = {stats.overlap_uniform:.3f})",
        f"  overlap {_summary(stats.overlap)}; chance from own load {_summary(stats.overlap_chance)}",
    ]
    if stats.num_layers > 1:
        lines += [
            "",
            "Next-layer top-1 predictability (lookup table trained on the first half of tokens, tested on the rest)",
            f"  accuracy {_summary(stats.next_layer_accuracy)}; majority baseline {_summary(stats.next_layer_majority)}",
        ]

    lines += ["", "Per layer:", "  layer  max/mean  entropy  overlap  chance  next-layer acc  majority"]
    for layer in range(stats.num_layers):
        if layer < stats.num_layers - 1:
            accuracy = _percent(stats.next_layer_accuracy[layer])
            majority = _percent(stats.next_layer_majority[layer])
        else:
            accuracy = majority = "-"
        lines.append(
            f"  {layer:5d}  {_number(stats.load_max_mean[layer], 2):>8}  {_number(stats.load_entropy_bits[layer]):>7}"
            f"  {_number(stats.overlap[layer]):>7}  {_number(stats.overlap_chance[layer]):>6}"
            f"  {accuracy:>14}  {majority:>8}"
        )

    lines += [
        "",
        f"Reuse distance (steps between consecutive requests of one (layer, expert); one pass = {stats.num_layers} steps)",
        f"  requests: {stats.num_requests}  never reused: {_percent(stats.never_reused_fraction)}",
    ]
    if stats.reuse_distance_quantiles:
        quantiles = "  ".join(f"p{round(100 * q):d} {value:g}" for q, value in stats.reuse_distance_quantiles.items())
        lines.append(f"  quantiles: {quantiles}")
        reused = sum(count for _, _, count in stats.reuse_distance_histogram)
        lines.append("  distance (steps)       count  share")
        for low, high, count in stats.reuse_distance_histogram:
            label = f"{low}" if low == high else f"{low}-{high}"
            lines.append(f"  {label:<17} {count:>10}  {_percent(count / reused):>6}")
    return "\n".join(lines) + "\n"

"""Per-pass input features, targets and pass splits of the learned next-layer predictor (host side, numpy).

For every step (pass p, layer l) the predictor gets what is known when layer l has routed: the
experts that layer l requests and the router probabilities of the last `window` layers l, l - 1, ...
of the same pass. Its targets are the step's rows of the oracle score table (`oracle_scores`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from specmd_jax.prefetch.sources import DEFAULT_MAX_BYTES, oracle_scores, train_pass_count
from specmd_jax.sim.requests import request_presence
from specmd_jax.traces.trace import Trace

FEATURE_SOURCES = ("router_logits", "scores", "presence")
"""Per-token router signal the features are made of, best first; `feature_source` picks the first the trace has."""


def feature_source(trace: Trace) -> str:
    """Return the best router signal in `trace`: full router logits, top-k scores, or only the selected ids."""
    if trace.router_logits is not None:
        return "router_logits"
    if trace.scores is not None:
        return "scores"
    return "presence"


def check_feature_source(trace: Trace, source: str) -> None:
    """Raise ValueError unless `trace` has the router signal `source` (one of `FEATURE_SOURCES`)."""
    if source not in FEATURE_SOURCES:
        raise ValueError(f"feature source: expected one of {', '.join(FEATURE_SOURCES)}, got {source!r}")
    available = {"router_logits": trace.router_logits, "scores": trace.scores, "presence": trace.expert_ids}
    if available[source] is None:
        raise ValueError(
            f"trace {trace.name} ({trace.metadata.source}) has no {source}, but the predictor was trained on "
            f"features made from {source}; use a trace recorded with them or train a predictor on this trace"
        )


def pass_router_probabilities(trace: Trace, source: str) -> np.ndarray:
    """Return float32 [T, L, E]: each pass's mean over its tokens of the router probability of every expert.

    `source` "router_logits" takes the softmax of the full logits, "scores" places each selected
    expert's score (0 elsewhere), and "presence" places 1 / K on each selected expert. Missing cells
    are left out of the mean, and a (pass, layer) whose cells are all missing is 0.
    """
    check_feature_source(trace, source)
    num_passes, num_layers, num_experts = trace.num_passes, trace.num_layers, trace.num_experts
    token_pass = np.repeat(np.arange(num_passes), np.diff(trace.pass_offsets))
    present = ~trace.missing  # [N, L]
    totals = np.zeros((num_passes, num_layers, num_experts), dtype=np.float64)

    if source == "router_logits":
        logits = np.where(present[..., None], trace.router_logits, 0.0).astype(np.float64)
        probabilities = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probabilities /= probabilities.sum(axis=-1, keepdims=True)
        probabilities *= present[..., None]
        totals = np.add.reduceat(probabilities, trace.pass_offsets[:-1].astype(np.int64), axis=0)
    else:
        ids = trace.expert_ids.astype(np.int64)
        if source == "scores":
            values = trace.scores.astype(np.float64)
        else:
            values = np.full(ids.shape, 1.0 / trace.top_k)
        token, layer, slot = np.nonzero(ids >= 0)
        np.add.at(totals, (token_pass[token], layer, ids[token, layer, slot]), values[token, layer, slot])

    counts = np.add.reduceat(present.astype(np.float64), trace.pass_offsets[:-1].astype(np.int64), axis=0)
    mean = np.divide(totals, counts[..., None], out=np.zeros_like(totals), where=counts[..., None] > 0)
    return mean.astype(np.float32)


def feature_width(num_experts: int, window: int) -> int:
    """Features per step: the step's request multi-hot plus `window` router-probability vectors."""
    return (window + 1) * num_experts


def build_features(trace: Trace, window: int, source: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Build float32 [T, L, F] step features, F = (window + 1) * E.

    Step (p, l) gets [requests of (p, l) as 0/1, probabilities of (p, l), of (p, l - 1), ...,
    of (p, l - window + 1)], with zeros for layers before 0. Only routing of the same pass at layers
    <= l is used, which is known when layer l has routed.
    """
    num_passes, num_layers, num_experts = trace.num_passes, trace.num_layers, trace.num_experts
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= num_layers:
        raise ValueError(f"window: expected an integer in [1, {num_layers}] (the layer count), got {window!r}")
    width = feature_width(num_experts, window)
    size = 4 * num_passes * num_layers * width
    if size > max_bytes:
        raise ValueError(
            f"features of shape ({num_passes}, {num_layers}, {width}) need {size} bytes, more than "
            f"max_bytes={max_bytes}. Use a shorter trace or a smaller window, or raise max_bytes"
        )
    probabilities = pass_router_probabilities(trace, source)
    features = np.zeros((num_passes, num_layers, width), dtype=np.float32)
    features[:, :, :num_experts] = request_presence(trace)
    for back in range(window):
        start = (back + 1) * num_experts
        features[:, back:, start:start + num_experts] = probabilities[:, : num_layers - back]
    return features


@dataclasses.dataclass(frozen=True)
class PassSplit:
    """Passes [0, train_end) train, [train_end, validation_end) validate, [validation_end, num_passes) test."""

    train_end: int
    validation_end: int
    num_passes: int

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def split_passes(num_passes: int, train_fraction: float = 0.75, validation_fraction: float = 0.15) -> PassSplit:
    """Split passes in order: the first `train_fraction` train and validate, the rest test.

    Validation is the last `validation_fraction` of the train-and-validation passes (at least one
    pass). Raises ValueError when any part would be empty.
    """
    validation_end = train_pass_count(num_passes, train_fraction)
    if not isinstance(validation_fraction, (float, int)) or not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction: expected a number in (0, 1), got {validation_fraction!r}")
    validation_passes = max(1, int(np.floor(validation_fraction * validation_end)))
    train_end = validation_end - validation_passes
    if train_end < 1:
        raise ValueError(
            f"{num_passes} passes with train_fraction={train_fraction} give {validation_end} train-and-validation "
            f"passes, too few to keep one for training after {validation_passes} for validation; use a longer trace"
        )
    return PassSplit(train_end=train_end, validation_end=validation_end, num_passes=num_passes)


@dataclasses.dataclass(frozen=True)
class StepTargets:
    """Training targets of every step.

    Attributes:
      requests: float32 [T, L, D, E], 1.0 where the target step s + j requests the expert.
      valid: bool [T, L, D], True where the target step exists and requests at least one expert.
    """

    requests: np.ndarray
    valid: np.ndarray

    def valid_before(self, end_pass: int) -> np.ndarray:
        """Return `valid` restricted to targets in passes < end_pass, so no label crosses a split boundary."""
        num_passes, num_layers, lookahead = self.valid.shape
        step = np.arange(num_passes * num_layers).reshape(num_passes, num_layers, 1)
        target = step + np.arange(1, lookahead + 1)
        return self.valid & (target < end_pass * num_layers)


def build_targets(trace: Trace, lookahead: int, *, max_bytes: int = DEFAULT_MAX_BYTES) -> StepTargets:
    """Build the oracle targets of `trace` for offsets 1 .. lookahead."""
    requests = oracle_scores(request_presence(trace), lookahead, max_bytes=max_bytes)
    return StepTargets(requests=requests, valid=requests.sum(axis=-1) > 0)

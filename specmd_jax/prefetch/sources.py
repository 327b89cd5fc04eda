"""Score tables of the free prefetch predictors (host side, numpy).

A score table is float32 [T, L, D, E] with D the lookahead. `table[p, l, j - 1, e]` is a non-negative
score that expert e is requested at the target step t = s + j, where s = p * L + l is the global step
that issues the prediction. The target step is layer t % L of pass t // L, so a lookahead past the last
layer wraps into the next pass. Entries whose target step lies past the trace's last step are 0.

Every builder takes `presence`, bool [T, L, E] from `specmd_jax.sim.requests.request_presence`, except
`gate_speculative_scores`, which reads the trace's speculative router logits. The builders that
estimate statistics (`frequency_scores`, `cooccurrence_scores`) use only the first `train_passes`
passes and leave the rows of the steps issued in those passes at 0, so they never predict a pass that
they were estimated on.
"""

from __future__ import annotations

import numpy as np

from specmd_jax.traces.trace import Trace

DEFAULT_MAX_BYTES = 2 * 1024**3
"""Largest score table (in bytes) that the builders allocate unless the caller raises `max_bytes`."""


def check_table_size(
    num_passes: int, num_layers: int, lookahead: int, num_experts: int, max_bytes: int = DEFAULT_MAX_BYTES
) -> None:
    """Raise ValueError when a float32 [T, L, D, E] table would exceed `max_bytes` bytes."""
    shape = (num_passes, num_layers, lookahead, num_experts)
    size = 4 * num_passes * num_layers * lookahead * num_experts
    if size > max_bytes:
        raise ValueError(
            f"score table of shape {shape} (T, L, D, E) needs {size} bytes, more than max_bytes={max_bytes}. "
            f"Use a shorter trace or lookahead, or raise max_bytes"
        )


def check_presence(presence: np.ndarray) -> tuple[int, int, int]:
    """Return (T, L, E) of `presence`, raising ValueError unless it is a bool [T, L, E] array with no empty axis."""
    if not isinstance(presence, np.ndarray):
        raise ValueError(f"presence: expected a numpy array, got {type(presence).__name__}")
    if presence.dtype != np.bool_:
        raise ValueError(f"presence: expected dtype bool, got {presence.dtype}")
    if presence.ndim != 3 or min(presence.shape) < 1:
        raise ValueError(f"presence: expected shape (T, L, E) with every axis >= 1, got {presence.shape}")
    num_passes, num_layers, num_experts = presence.shape
    return num_passes, num_layers, num_experts


def check_lookahead(lookahead: int, num_layers: int) -> None:
    """Raise ValueError unless 1 <= lookahead <= num_layers."""
    if isinstance(lookahead, bool) or not isinstance(lookahead, (int, np.integer)):
        raise ValueError(f"lookahead: expected an integer, got {lookahead!r}")
    if not 1 <= lookahead <= num_layers:
        raise ValueError(f"lookahead: expected 1 <= lookahead <= {num_layers} (the layer count), got {lookahead}")


def check_train_passes(train_passes: int, num_passes: int) -> None:
    """Raise ValueError unless 1 <= train_passes < num_passes, so both the estimate and the rest are non-empty."""
    if isinstance(train_passes, bool) or not isinstance(train_passes, (int, np.integer)):
        raise ValueError(f"train_passes: expected an integer, got {train_passes!r}")
    if not 1 <= train_passes < num_passes:
        raise ValueError(
            f"train_passes: expected 1 <= train_passes < {num_passes} (the pass count), got {train_passes}; "
            f"the first train_passes passes estimate the statistics and the others are predicted"
        )


def train_pass_count(num_passes: int, train_fraction: float) -> int:
    """Return floor(train_fraction * num_passes), the passes used to estimate statistics.

    Raises ValueError when that count is 0 (nothing to train on) or num_passes (nothing to evaluate).
    """
    if not isinstance(train_fraction, (float, int)) or isinstance(train_fraction, bool) or not 0 < train_fraction <= 1:
        raise ValueError(f"train_fraction: expected a number in (0, 1), got {train_fraction!r}")
    count = int(np.floor(train_fraction * num_passes))
    if count == 0:
        raise ValueError(
            f"train_fraction={train_fraction} of {num_passes} passes leaves 0 passes to train on; "
            f"raise train_fraction or use a longer trace"
        )
    if count >= num_passes:
        raise ValueError(
            f"train_fraction={train_fraction} of {num_passes} passes leaves no pass to evaluate; "
            f"lower train_fraction or use a longer trace"
        )
    return count


def _validate(presence: np.ndarray, lookahead: int, max_bytes: int) -> tuple[int, int, int]:
    num_passes, num_layers, num_experts = check_presence(presence)
    check_lookahead(lookahead, num_layers)
    check_table_size(num_passes, num_layers, lookahead, num_experts, max_bytes)
    return num_passes, num_layers, num_experts


def _spread_over_offsets(per_target: np.ndarray, num_layers: int, lookahead: int) -> np.ndarray:
    """Build a [T, L, D, E] table with `table[s, j - 1] = per_target[s + j]`, 0 past the last step.

    `per_target` is float32 [T * L, E], the score of each expert at each (target) global step.
    """
    num_steps, num_experts = per_target.shape
    table = np.zeros((num_steps, lookahead, num_experts), dtype=np.float32)
    for offset in range(1, lookahead + 1):
        if offset < num_steps:
            table[: num_steps - offset, offset - 1] = per_target[offset:]
    return table.reshape(num_steps // num_layers, num_layers, lookahead, num_experts)


def clear_past_last_step(table: np.ndarray) -> None:
    """Set to 0, in place, the entries of a [T, L, D, E] table whose target step s + j is past the last step."""
    num_passes, num_layers, lookahead, num_experts = table.shape
    flat = table.reshape(num_passes * num_layers, lookahead, num_experts)
    num_steps = flat.shape[0]
    for offset in range(1, lookahead + 1):
        flat[max(num_steps - offset, 0):, offset - 1] = 0.0


def oracle_scores(presence: np.ndarray, lookahead: int, *, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Build the oracle table: 1.0 where the target step requests the expert, else 0."""
    num_passes, num_layers, num_experts = _validate(presence, lookahead, max_bytes)
    per_target = presence.reshape(num_passes * num_layers, num_experts).astype(np.float32)
    return _spread_over_offsets(per_target, num_layers, lookahead)


def current_layer_scores(presence: np.ndarray, lookahead: int, *, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Build the current-layer table: every offset predicts the expert ids that the issuing step requests.

    Expert e of one layer and expert e of another are different weights, so this baseline only scores
    well where routing happens to reuse ids across layers. Targets past the last step score 0.
    """
    _validate(presence, lookahead, max_bytes)
    table = np.repeat(presence[:, :, None, :].astype(np.float32), lookahead, axis=2)
    clear_past_last_step(table)
    return table


def previous_pass_scores(presence: np.ndarray, lookahead: int, *, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Build the previous-pass table: the target layer's requests one pass earlier (step t - L).

    Targets in the first pass have no earlier pass and score 0.
    """
    num_passes, num_layers, num_experts = _validate(presence, lookahead, max_bytes)
    per_target = np.zeros((num_passes, num_layers, num_experts), dtype=np.float32)
    per_target[1:] = presence[:-1]
    return _spread_over_offsets(per_target.reshape(-1, num_experts), num_layers, lookahead)


def layer_frequencies(presence: np.ndarray, train_passes: int) -> np.ndarray:
    """Return float32 [L, E]: the fraction of the first `train_passes` passes that request e at layer l."""
    num_passes, _, _ = check_presence(presence)
    check_train_passes(train_passes, num_passes)
    return presence[:train_passes].mean(axis=0, dtype=np.float64).astype(np.float32)


def frequency_scores(
    presence: np.ndarray, lookahead: int, train_passes: int, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> np.ndarray:
    """Build the global-frequency table: each target layer's request frequency over the training passes.

    The score of e at target step t is `layer_frequencies(presence, train_passes)[t % L, e]`. Rows of
    steps issued in passes < train_passes are 0.
    """
    num_passes, num_layers, num_experts = _validate(presence, lookahead, max_bytes)
    frequencies = layer_frequencies(presence, train_passes)
    per_target = np.broadcast_to(frequencies, (num_passes, num_layers, num_experts)).reshape(-1, num_experts)
    table = _spread_over_offsets(np.ascontiguousarray(per_target), num_layers, lookahead)
    table[:train_passes] = 0.0
    return table


def cooccurrence_transitions(presence: np.ndarray, lookahead: int, train_passes: int) -> np.ndarray:
    """Estimate float32 [D, L, E, E] transition probabilities from the training passes.

    `P[j - 1, l, e, f]` is the fraction of training steps (p, l) that request e whose step s + j requests
    f. Only steps s whose issuing and target steps both lie in passes < train_passes count, so no
    evaluation pass leaks into the estimate. Rows of experts never requested there are 0.
    """
    num_passes, num_layers, num_experts = check_presence(presence)
    check_lookahead(lookahead, num_layers)
    check_train_passes(train_passes, num_passes)
    flat = presence.reshape(num_passes * num_layers, num_experts).astype(np.float32)
    train_steps = train_passes * num_layers
    transitions = np.zeros((lookahead, num_layers, num_experts, num_experts), dtype=np.float32)
    for offset in range(1, lookahead + 1):
        # Issuing steps 0 .. train_steps - offset - 1, so each target step s + offset is a training step.
        issuing = flat[: train_steps - offset]
        target = flat[offset:train_steps]
        layer_of_step = np.arange(train_steps - offset) % num_layers
        for layer in range(num_layers):
            rows = layer_of_step == layer
            pair_counts = issuing[rows].T @ target[rows]
            issue_counts = issuing[rows].sum(axis=0)
            np.divide(
                pair_counts, issue_counts[:, None], out=transitions[offset - 1, layer], where=issue_counts[:, None] > 0
            )
    return transitions


def cooccurrence_scores(
    presence: np.ndarray, lookahead: int, train_passes: int, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> np.ndarray:
    """Build the co-occurrence table from `cooccurrence_transitions`.

    The score of f at issuing step s = (p, l) and offset j is the mean of `P[j - 1, l, e, f]` over the
    experts e requested at s, or 0 when s has no requests. Rows of steps issued in passes < train_passes
    are 0.
    """
    num_passes, num_layers, num_experts = _validate(presence, lookahead, max_bytes)
    transitions = cooccurrence_transitions(presence, lookahead, train_passes)
    table = np.zeros((num_passes, num_layers, lookahead, num_experts), dtype=np.float32)
    current = presence[train_passes:].astype(np.float32)  # [T', L, E], the issuing steps that are predicted
    request_counts = current.sum(axis=-1, keepdims=True)
    for offset in range(1, lookahead + 1):
        summed = np.einsum("ple,lef->plf", current, transitions[offset - 1])
        table[train_passes:, :, offset - 1] = np.divide(
            summed, request_counts, out=np.zeros_like(summed), where=request_counts > 0
        )

    clear_past_last_step(table)
    return table


def gate_speculative_scores(trace: Trace, lookahead: int, *, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Build the gate-speculative table from `trace.speculative_logits`.

    Layer l + 1's router applied to the hidden state entering layer l predicts layer l + 1, so only the
    offset j = 1 is filled: `table[p, l, 0]` is the mean over the tokens of pass p of the softmax of their
    speculative logits at layer l. Rows j >= 2 are 0, and so is the last layer's j = 1 row, whose target
    (layer 0 of the next pass) has no speculative logits. Tokens whose logits at layer l are not finite
    (missing cells) are left out of the mean; a pass without such tokens scores 0.

    Raises ValueError, naming the trace, when it has no speculative logits.
    """
    if trace.speculative_logits is None:
        raise ValueError(
            f"trace {trace.name} ({trace.metadata.source}) has no speculative_logits; the gate-speculative "
            f"predictor needs a trace recorded with them"
        )
    num_passes, num_layers, num_experts = trace.num_passes, trace.num_layers, trace.num_experts
    check_lookahead(lookahead, num_layers)
    check_table_size(num_passes, num_layers, lookahead, num_experts, max_bytes)
    table = np.zeros((num_passes, num_layers, lookahead, num_experts), dtype=np.float32)
    if num_layers == 1:
        return table

    logits = trace.speculative_logits[:, : num_layers - 1].astype(np.float64)  # [N, L - 1, E]
    valid = np.all(np.isfinite(logits), axis=-1)  # [N, L - 1]
    logits = np.where(valid[..., None], logits, 0.0)
    probabilities = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probabilities /= probabilities.sum(axis=-1, keepdims=True)
    probabilities *= valid[..., None]

    # Per-pass sums of token probabilities and of valid tokens (every pass has at least one token).
    offsets = trace.pass_offsets.astype(np.int64)
    summed = np.add.reduceat(probabilities, offsets[:-1], axis=0)  # [T, L - 1, E]
    counts = np.add.reduceat(valid.astype(np.float64), offsets[:-1], axis=0)  # [T, L - 1]
    mean = np.divide(summed, counts[..., None], out=np.zeros_like(summed), where=counts[..., None] > 0)
    table[:, : num_layers - 1, 0] = mean.astype(np.float32)
    return table

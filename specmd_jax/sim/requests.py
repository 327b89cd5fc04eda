"""Turn a trace into the per-step request tensors that the simulator scans over (host side, numpy)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from specmd_jax.policies.base import NEVER
from specmd_jax.traces.trace import Trace


class StepRequests(NamedTuple):
    """Requests of every step (pass p, layer l).

    experts: int32 [T, L, R], the distinct experts requested at (p, l) in ascending order, -1 padded.
    next_step: int32 [T, L, R], global step index (p' * L + l) of the same expert's next request, or
      NEVER; -1 in padded slots.
    counts: int32 [T, L], number of requests of each step.
    """

    experts: np.ndarray
    next_step: np.ndarray
    counts: np.ndarray

    @property
    def num_passes(self) -> int:
        return self.experts.shape[0]

    @property
    def num_layers(self) -> int:
        return self.experts.shape[1]

    @property
    def max_requests(self) -> int:
        return self.experts.shape[2]


def request_presence(trace: Trace) -> np.ndarray:
    """Return bool [T, L, E]: whether pass p requests expert e at layer l."""
    T, L, E = trace.num_passes, trace.num_layers, trace.num_experts
    presence = np.zeros((T, L, E), dtype=bool)
    token_pass = np.repeat(np.arange(T), np.diff(trace.pass_offsets))
    ids = trace.expert_ids.astype(np.int64)
    valid = ids >= 0
    token_index, layer_index, _ = np.nonzero(valid)
    presence[token_pass[token_index], layer_index, ids[valid]] = True
    return presence


def build_requests(trace: Trace) -> StepRequests:
    """Compute the request tensors of `trace` (see `StepRequests`)."""
    presence = request_presence(trace)
    T, L, E = presence.shape
    counts = presence.sum(axis=-1, dtype=np.int32)
    max_requests = max(int(counts.max(initial=0)), 1)

    # A stable argsort of "not present" lists the present experts first, in ascending id.
    order = np.argsort(~presence, axis=-1, kind="stable")[..., :max_requests].astype(np.int32)
    slot_used = np.arange(max_requests)[None, None, :] < counts[..., None]
    experts = np.where(slot_used, order, -1).astype(np.int32)

    # Next request of each (layer, expert) after pass p: a reversed running minimum of request passes.
    request_pass = np.where(presence, np.arange(T, dtype=np.int64)[:, None, None], np.iinfo(np.int64).max)
    following = np.empty_like(request_pass)
    following[-1] = np.iinfo(np.int64).max
    if T > 1:
        following[:-1] = np.minimum.accumulate(request_pass[::-1], axis=0)[::-1][1:]
    layer_offset = np.arange(L, dtype=np.int64)[None, :, None]
    next_step_all = np.where(following == np.iinfo(np.int64).max, NEVER, following * L + layer_offset)
    if (next_step_all[next_step_all != NEVER] >= NEVER).any():
        raise ValueError(f"trace has {T} passes x {L} layers: too many steps for int32 step indices")
    gathered = np.take_along_axis(next_step_all, np.maximum(experts, 0), axis=-1)
    next_step = np.where(slot_used, gathered, -1).astype(np.int32)
    return StepRequests(experts=experts, next_step=next_step, counts=counts)


def mean_router_probabilities(trace: Trace) -> np.ndarray:
    """Return float32 [T, L, E]: per pass and layer, the mean over its tokens of softmax(router logits).

    Missing cells are left out; a step whose cells are all missing gets zeros. Raises ValueError when the
    trace has no router logits.
    """
    if trace.router_logits is None:
        raise ValueError(
            f"trace '{trace.name}' has no router logits, which choosing substitutes for missed experts needs; "
            "record the trace with `specmd-jax record` to keep them"
        )
    logits = trace.router_logits.astype(np.float64)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=-1, keepdims=True)
    valid = ~trace.missing
    probabilities = np.where(valid[..., None], probabilities, 0.0)
    token_pass = np.repeat(np.arange(trace.num_passes), np.diff(trace.pass_offsets))
    sums = np.zeros((trace.num_passes, trace.num_layers, trace.num_experts))
    np.add.at(sums, token_pass, probabilities)
    counts = np.zeros((trace.num_passes, trace.num_layers))
    np.add.at(counts, token_pass, valid.astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts[..., None] > 0, sums / counts[..., None], 0.0)
    return mean.astype(np.float32)

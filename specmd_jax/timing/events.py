"""Read the simulator's recorded events for the timing model: the prefetch plan, and the work of misses computed on the host.

The events are those of `run_sweep(..., record_events=True)` for one configuration, as numpy arrays
with leaves [T, L, ...]. Request slot j of step (p, l) is the j-th expert of
`build_requests(trace).experts[p, l]`, so its flat id is l * E + that expert.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from specmd_jax.sim.engine import OUTCOME_CAPACITY, OUTCOME_COLLISION, OUTCOME_COMPULSORY, OUTCOME_HIT
from specmd_jax.sim.requests import StepRequests, build_requests
from specmd_jax.timing.timeline import NO_CONSUMER
from specmd_jax.traces.trace import Trace

MISS_OUTCOMES = (OUTCOME_COMPULSORY, OUTCOME_CAPACITY, OUTCOME_COLLISION)


def has_prefetch_events(events: Any) -> bool:
    """Return True when `events` record prefetches, as `PrefetchEvents` with `prefetched` and `prefetch_source` do."""
    return hasattr(events, "prefetched") and hasattr(events, "prefetch_source")


def _integer_array(events: Any, field: str) -> np.ndarray:
    values = np.asarray(getattr(events, field))
    if values.dtype.kind not in "iu":
        raise ValueError(f"events.{field}: expected an integer array, got dtype {values.dtype}")
    return values.astype(np.int64)


def prefetch_plan_from_events(trace: Trace, events: Any, requests: StepRequests | None = None) -> list[list[int]]:
    """Build the `PrefetchPlan` of a simulated prefetcher from its `PrefetchEvents`.

    Returns one list per global step s = p * L + l: the consumer step of each expert that s prefetched,
    in issue order. The consumer is the step whose request slot has that flat id and a
    `prefetch_source` equal to s. A prefetch that no request used (it was evicted first, or never
    requested) gets `NO_CONSUMER`.

    Args:
      trace: the trace the events were simulated on.
      events: `PrefetchEvents` with leaves [T, L, ...] (numpy or JAX arrays).
      requests: `build_requests(trace)`, when the caller already has it.

    Raises ValueError when the events' shapes do not fit the trace, or when `prefetch_source` names a
    prefetch that the events do not record.
    """
    if not has_prefetch_events(events):
        raise ValueError(
            f"events: expected PrefetchEvents with `prefetched` and `prefetch_source`, got {type(events).__name__}; "
            "record them with run_sweep(..., record_events=True) on a configuration with a prefetcher or host misses"
        )
    requests = build_requests(trace) if requests is None else requests
    T, L, E = trace.num_passes, trace.num_layers, trace.num_experts
    num_steps = T * L
    outcomes = np.asarray(events.outcomes)
    prefetched = _integer_array(events, "prefetched")
    source = _integer_array(events, "prefetch_source")

    # Shapes and value ranges against the trace.
    slots = requests.experts.shape
    for field, values in (("outcomes", outcomes), ("prefetch_source", source)):
        if values.shape != slots:
            raise ValueError(
                f"events.{field}: expected shape {slots} (passes, layers, request slots of this trace), got {values.shape}; "
                "pass the events that run_sweep recorded for the same trace"
            )
    if prefetched.ndim != 3 or prefetched.shape[:2] != (T, L):
        raise ValueError(f"events.prefetched: expected shape ({T}, {L}, B) for this trace, got {prefetched.shape}")
    if prefetched.size and not ((prefetched >= -1) & (prefetched < L * E)).all():
        bad = prefetched[(prefetched < -1) | (prefetched >= L * E)][0]
        raise ValueError(f"events.prefetched: expected flat ids in [0, {L * E}) or -1 (padding), got {bad}")
    if source.size and not ((source >= -1) & (source < num_steps)).all():
        bad = source[(source < -1) | (source >= num_steps)][0]
        raise ValueError(f"events.prefetch_source: expected a step in [0, {num_steps}) or -1, got {bad}")

    # Each request slot that hit a pending prefetch names the step that issued it.
    consumer_of: dict[tuple[int, int], int] = {}
    for p, l, j in zip(*np.nonzero(source >= 0)):
        consumer = int(p) * L + int(l)
        issue = int(source[p, l, j])
        expert = int(requests.experts[p, l, j])
        where = f"events.prefetch_source[{p}, {l}, {j}] = {issue}"
        if expert < 0 or outcomes[p, l, j] != OUTCOME_HIT:
            raise ValueError(f"{where}: expected -1 unless the slot is a hit, but its outcome is {int(outcomes[p, l, j])}")
        if issue >= consumer:
            raise ValueError(f"{where}: expected a step before the requesting step {consumer}")
        key = (issue, int(l) * E + expert)
        if key in consumer_of:
            raise ValueError(f"{where}: steps {consumer_of[key]} and {consumer} both claim the prefetch of flat id {key[1]}")
        consumer_of[key] = consumer

    # Walk every step's prefetches in issue order and attach their consumers.
    plan: list[list[int]] = [[] for _ in range(num_steps)]
    issued = prefetched.reshape(num_steps, -1)
    for step in np.flatnonzero((issued >= 0).any(axis=1)):
        flat_ids = issued[step][issued[step] >= 0].tolist()
        if len(set(flat_ids)) != len(flat_ids):
            raise ValueError(f"events.prefetched: step {step} prefetches a flat id twice: {flat_ids}")
        plan[int(step)] = [consumer_of.pop((int(step), flat), NO_CONSUMER) for flat in flat_ids]
    if consumer_of:
        (issue, flat), consumer = next(iter(consumer_of.items()))
        raise ValueError(
            f"events.prefetch_source: step {consumer} hit flat id {flat} as prefetched by step {issue}, "
            f"but events.prefetched has no such prefetch at step {issue}"
        )
    return plan


def miss_slots(outcomes: np.ndarray) -> np.ndarray:
    """Return bool [T, L, R]: which request slots missed (compulsory, capacity or collision)."""
    return np.isin(np.asarray(outcomes), MISS_OUTCOMES)


def host_expert_pairs(trace: Trace, requests: StepRequests, missed: np.ndarray) -> np.ndarray:
    """Count, per step, the (token, expert) pairs whose expert missed, int64 [T, L]: the pairs the host computes.

    `missed` is bool [T, L, R] over the request slots of `requests`. Cells with unknown routing count
    for no expert.
    """
    T, L, E = trace.num_passes, trace.num_layers, trace.num_experts
    on_host = np.zeros((T, L, E), bool)
    p, l, j = np.nonzero(missed)
    on_host[p, l, requests.experts[p, l, j]] = True

    # Look up every (token, layer, rank) cell in the missed set of its pass and layer.
    ids = trace.expert_ids
    valid = ids >= 0
    token_pass = np.repeat(np.arange(T), np.diff(trace.pass_offsets))
    layers = np.arange(L)[None, :, None]
    hit_host = on_host[token_pass[:, None, None], layers, np.where(valid, ids, 0)] & valid
    per_token = hit_host.sum(axis=-1, dtype=np.int64)  # [N, L]

    # Sum the tokens of each pass: differences of a running sum at the pass offsets.
    running = np.zeros((per_token.shape[0] + 1, L), np.int64)
    np.cumsum(per_token, axis=0, out=running[1:])
    offsets = np.asarray(trace.pass_offsets, np.int64)
    return running[offsets[1:]] - running[offsets[:-1]]

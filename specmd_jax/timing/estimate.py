"""Latency estimates of a simulated expert cache: TTFT, TPOT and stall time, with two reference timelines."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from specmd_jax.sim.engine import OUTCOME_COLLISION, OUTCOME_NONE
from specmd_jax.sim.requests import build_requests
from specmd_jax.timing.compute import dense_layers_time, host_experts_time, lm_head_time, moe_layer_times
from specmd_jax.timing.events import has_prefetch_events, host_expert_pairs, miss_slots, prefetch_plan_from_events
from specmd_jax.timing.hardware import Hardware
from specmd_jax.timing.models import ModelShape
from specmd_jax.timing.timeline import PrefetchPlan, Timeline, simulate_timeline
from specmd_jax.traces.trace import PASS_DECODE, PASS_PREFILL, Trace

MISS_MODES = ("demand", "host", "substitute")
"""Miss handling that the timing model covers (`SimConfig.miss`)."""

NOTE_NO_PREFILL = "the trace has no prefill pass, so only TPOT is reported (TTFT is None)"


@dataclasses.dataclass(frozen=True)
class LatencySummary:
    """Latency figures of one timeline, in seconds.

    Attributes:
      total_time: end of the last pass.
      total_stall: time all layers waited for experts.
      ttft: mean time to first token over the sequences that have one (see `sequence_ttft`), or None.
      tpot: mean time of a decode pass over all decode passes, or None when there is none.
    """

    total_time: float
    total_stall: float
    ttft: float | None
    tpot: float | None


@dataclasses.dataclass(frozen=True, eq=False)  # numpy fields: compare the summaries instead
class TimingResult:
    """Timing of one cache configuration on one trace, with its two references.

    Attributes:
      hardware, model: what the times were computed for.
      transfer_time: seconds one expert transfer occupies the link.
      compute: float64 [T, L], compute seconds of each MoE layer in each pass with every requested
        expert on the accelerator (the all-resident and no-cache references use it).
      timeline: the timeline of the simulated cache (misses become demand loads, or host compute).
      timed: its latency figures.
      all_resident: the same passes with every expert resident (no transfers).
      no_cache: the same passes with every requested expert transferred at every step.
      ttft_per_sequence: time to first token of each sequence that has one, by sequence id.
      demand_loads, prefetches: transfers of each kind in the timed timeline.
      late_prefetches: prefetches with a consumer step that arrived after that step's layer was
        reached, so the layer stalled for them (promoted ones included).
      demand_bytes, prefetch_bytes: bytes moved over the link by each kind, transfers x expert bytes.
      miss: how misses were handled: "demand" (loaded) or "host" (computed on the host CPU).
      host_computed: misses computed on the host (0 in demand mode).
      device_compute: float64 [T, L], what the accelerator computes in the timed timeline: `compute`
        in demand mode, without the missed experts in host mode.
      host_compute: float64 [T, L], host seconds of each step's missed experts in host mode, else None.
      note: why a figure is missing, or "".
    """

    hardware: Hardware
    model: ModelShape
    transfer_time: float
    compute: np.ndarray
    timeline: Timeline
    timed: LatencySummary
    all_resident: LatencySummary
    no_cache: LatencySummary
    ttft_per_sequence: dict[int, float]
    demand_loads: int
    prefetches: int
    late_prefetches: int
    demand_bytes: int
    prefetch_bytes: int
    miss: str
    host_computed: int
    device_compute: np.ndarray
    host_compute: np.ndarray | None
    note: str = ""

    @property
    def ttft(self) -> float | None:
        return self.timed.ttft

    @property
    def tpot(self) -> float | None:
        return self.timed.tpot

    @property
    def total_stall(self) -> float:
        return self.timed.total_stall


def sequence_runs(pass_sequence: np.ndarray) -> list[tuple[int, int, int]]:
    """Return (sequence id, first pass, end pass) of each run of equal sequence ids, in trace order."""
    pass_sequence = np.asarray(pass_sequence)
    starts = np.flatnonzero(np.r_[True, pass_sequence[1:] != pass_sequence[:-1]])
    ends = np.r_[starts[1:], len(pass_sequence)]
    return [(int(pass_sequence[first]), int(first), int(end)) for first, end in zip(starts, ends)]


def sequence_ttft(pass_time: np.ndarray, pass_kind: np.ndarray, pass_sequence: np.ndarray) -> dict[int, float]:
    """Time to first token of each sequence: its leading prefill passes plus its first decode pass.

    A sequence that does not start with a prefill pass, or has no decode pass after it, has no TTFT
    and is left out. Prefill passes after the first decode pass (a later turn) are not counted.
    """
    result: dict[int, float] = {}
    for sequence, first, end in sequence_runs(pass_sequence):
        kinds = np.asarray(pass_kind[first:end])
        decode = np.flatnonzero(kinds == PASS_DECODE)
        if kinds[0] != PASS_PREFILL or len(decode) == 0:
            continue
        first_decode = first + int(decode[0])
        result[sequence] = float(pass_time[first:first_decode + 1].sum())
    return result


def summarize(timeline: Timeline, pass_kind: np.ndarray, pass_sequence: np.ndarray) -> tuple[LatencySummary, dict[int, float]]:
    """Latency figures of `timeline`, and the TTFT of each sequence that has one."""
    per_sequence = sequence_ttft(timeline.pass_time, pass_kind, pass_sequence)
    decode = np.asarray(pass_kind) == PASS_DECODE
    summary = LatencySummary(
        total_time=timeline.total_time,
        total_stall=timeline.total_stall,
        ttft=float(np.mean(list(per_sequence.values()))) if per_sequence else None,
        tpot=float(timeline.pass_time[decode].mean()) if decode.any() else None,
    )
    return summary, per_sequence


def sequence_context(pass_offsets: np.ndarray, pass_sequence: np.ndarray) -> np.ndarray:
    """Count, for each pass, the tokens of its sequence in earlier passes (its attention context), int64 [T]."""
    tokens = np.diff(np.asarray(pass_offsets, np.int64))
    before = np.cumsum(tokens) - tokens
    context = np.empty_like(before)
    for _, first, end in sequence_runs(pass_sequence):
        context[first:end] = before[first:end] - before[first]
    return context


def _checked_outcomes(trace: Trace, events: Any, request_counts: np.ndarray) -> np.ndarray:
    """Return the per-slot outcomes of `events`, int8 [T, L, R], after checking them against the trace."""
    outcomes = np.asarray(getattr(events, "outcomes", events))
    expected = (trace.num_passes, trace.num_layers)
    if outcomes.ndim != 3 or outcomes.shape[:2] != expected:
        raise ValueError(
            f"events: expected outcomes of shape ({expected[0]}, {expected[1]}, R) for this trace, got {outcomes.shape}; "
            "pass the events that run_sweep(..., record_events=True) returned for the same trace"
        )
    invalid = (outcomes < OUTCOME_NONE) | (outcomes > OUTCOME_COLLISION)
    if invalid.any():
        index = tuple(int(i) for i in np.argwhere(invalid)[0])
        raise ValueError(
            f"events: outcome {int(outcomes[index])} at index {index} is not an outcome code; expected "
            f"{OUTCOME_NONE} to {OUTCOME_COLLISION}"
        )
    requested = (outcomes != OUTCOME_NONE).sum(axis=-1)
    if not np.array_equal(requested, request_counts):
        p, l = np.argwhere(requested != request_counts)[0]
        raise ValueError(
            f"events: step (pass {p}, layer {l}) has {requested[p, l]} requests but the trace requests "
            f"{request_counts[p, l]} experts there; the events were recorded on another trace"
        )
    return outcomes


def check_model_matches(trace: Trace, model: ModelShape) -> None:
    """Raise `ValueError` unless `model` has the trace's MoE layer count, experts per layer and top-k."""
    meta = trace.metadata
    pairs = (
        ("MoE layers", meta.num_layers, model.num_moe_layers),
        ("experts per layer", meta.num_experts, model.num_experts),
        ("top-k", meta.top_k, model.top_k),
    )
    for quantity, in_trace, in_model in pairs:
        if in_trace != in_model:
            raise ValueError(
                f"trace '{meta.model}' has {in_trace} {quantity} but model shape '{model.name}' has {in_model}; "
                "choose the model preset of the traced model, or a ModelShape with the same counts"
            )


def estimate_timing(
    trace: Trace,
    events: Any,
    hardware: Hardware,
    model: ModelShape,
    *,
    prefetches: PrefetchPlan | None = None,
    miss: str = "demand",
    record_transfers: bool = False,
) -> TimingResult:
    """Estimate TTFT, TPOT and stall time of one simulated cache configuration on `trace`.

    Args:
      trace: the trace the events were simulated on.
      events: that configuration's events from `run_sweep(..., record_events=True)`: `StepEvents`,
        `PrefetchEvents`, or only the `outcomes` array int8 [T, L, R]. Compulsory, capacity and
        collision outcomes are misses. `PrefetchEvents` also give the prefetch plan (see
        `prefetch_plan_from_events`).
      hardware, model: presets from `specmd_jax.timing.hardware` and `specmd_jax.timing.models`.
      prefetches: transfers issued at the start of each step (see `PrefetchPlan`) when `events` do not
        record them; None issues none. Passing it with `PrefetchEvents` raises ValueError.
      miss: the configuration's miss handling (`SimConfig.miss`): "demand" loads each miss over the
        link; "host" computes the missed experts on the host CPU while the accelerator computes the
        rest of the layer (needs `hardware.host_flops` and `hardware.host_memory_bandwidth`);
        "substitute" loads only the misses that no resident substitute replaced (the events' `substitute`).
      record_transfers: keep the log of every transfer in `result.timeline.transfers`.
    """
    if miss not in MISS_MODES:
        raise ValueError(f"miss: expected one of {', '.join(MISS_MODES)} (the modes the timing model covers), got {miss!r}")
    substituted = getattr(events, "substitute", None)
    if miss != "substitute" and substituted is not None and (np.asarray(substituted) >= 0).any():
        raise ValueError(
            f"events: they record substituted misses, so they come from a run with miss mode 'substitute', "
            f"but miss is {miss!r}; pass the run's SimConfig.miss"
        )
    check_model_matches(trace, model)
    requests = build_requests(trace)
    request_counts = requests.counts.astype(np.int64)
    outcomes = _checked_outcomes(trace, events, request_counts)
    missed = miss_slots(outcomes)
    misses = missed.sum(axis=-1, dtype=np.int64)
    if has_prefetch_events(events):
        if prefetches is not None:
            raise ValueError(
                "prefetches: expected None when the events record prefetches (PrefetchEvents), because the plan "
                "is built from them; pass one or the other"
            )
        prefetches = prefetch_plan_from_events(trace, events, requests)

    tokens = np.diff(trace.pass_offsets).astype(np.float64)
    context = sequence_context(trace.pass_offsets, trace.pass_sequence).astype(np.float64)
    compute = moe_layer_times(model, hardware, tokens, context, request_counts)
    prologue = dense_layers_time(model, hardware, tokens, context)
    epilogue = lm_head_time(model, hardware, trace.num_passes)
    transfer_time = hardware.transfer_time(model.expert_bytes)

    # Host mode: the host computes the missed experts, the accelerator the resident ones, and nothing loads.
    host_compute = None
    device_compute = compute
    demand = misses
    if miss == "host":
        host_pairs = host_expert_pairs(trace, requests, missed)
        host_compute = host_experts_time(model, hardware, host_pairs, misses)
        device_pairs = tokens[:, None] * model.top_k - host_pairs
        device_compute = moe_layer_times(model, hardware, tokens, context, request_counts - misses, pairs=device_pairs)
        demand = np.zeros_like(misses)
    elif miss == "substitute":
        substitute = getattr(events, "substitute", None)
        if substitute is None or np.shape(substitute) != np.shape(outcomes):
            raise ValueError(
                f"events: miss mode 'substitute' needs the PrefetchEvents of a substitute run, with `substitute` of shape "
                f"{np.shape(outcomes)}; got {None if substitute is None else np.shape(substitute)}"
            )
        # NOTE: a substitute that is still an in-flight prefetch is treated as resident (no wait).
        demand = misses - (np.asarray(substitute) >= 0).sum(axis=-1, dtype=np.int64)

    def run(
        layer_compute: np.ndarray, loads: np.ndarray, plan: PrefetchPlan | None, host: np.ndarray | None, record: bool
    ) -> Timeline:
        return simulate_timeline(
            layer_compute, loads, transfer_time, prefetches=plan, host_compute=host, prologue=prologue, epilogue=epilogue,
            record_transfers=record,
        )

    # The timed timeline always logs its transfers, because late prefetches are read from the log.
    timeline = run(device_compute, demand, prefetches, host_compute, True)
    late_prefetches = timeline.late_prefetches
    if not record_transfers:
        timeline = dataclasses.replace(timeline, transfers=None)
    resident = run(compute, np.zeros_like(misses), None, None, False)
    no_cache = run(compute, request_counts, None, None, False)

    kinds, sequences = trace.pass_kind, trace.pass_sequence
    timed, per_sequence = summarize(timeline, kinds, sequences)
    note = ""
    if not (kinds == PASS_PREFILL).any():
        note = NOTE_NO_PREFILL
    elif timed.ttft is None:
        note = "no sequence has a prefill pass followed by a decode pass, so TTFT is None"
    if not (kinds == PASS_DECODE).any():
        note = "the trace has no decode pass, so TTFT and TPOT are None; see total_time and the stall time"
    num_prefetches = 0
    if prefetches is not None:
        lists = prefetches.values() if isinstance(prefetches, Mapping) else prefetches
        num_prefetches = sum(len(consumers) for consumers in lists)
    demand_loads = int(demand.sum())
    return TimingResult(
        hardware=hardware,
        model=model,
        transfer_time=transfer_time,
        compute=compute,
        timeline=timeline,
        timed=timed,
        all_resident=summarize(resident, kinds, sequences)[0],
        no_cache=summarize(no_cache, kinds, sequences)[0],
        ttft_per_sequence=per_sequence,
        demand_loads=demand_loads,
        prefetches=num_prefetches,
        late_prefetches=late_prefetches,
        demand_bytes=demand_loads * model.expert_bytes,
        prefetch_bytes=num_prefetches * model.expert_bytes,
        miss=miss,
        host_computed=int(misses.sum()) if miss == "host" else 0,
        device_compute=device_compute,
        host_compute=host_compute,
        note=note,
    )

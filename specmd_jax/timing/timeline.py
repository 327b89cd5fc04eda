"""Event-driven timeline of layer compute and expert transfers over one host-to-device link (host side, numpy).

A step is (pass p, MoE layer l), with global index s = p * L + l, as in the simulator. Time runs over
the passes in order; within a pass, the prologue (the leading dense layers), the MoE layers 0 .. L-1
and the epilogue (the LM head) run one after another on the accelerator.

Rules, applied when step s is reached at time `ready` (the end of the previous layer or prologue):
- The demand loads of s (its misses) are issued at `ready`. The link serves one whole-expert transfer
  at a time, each taking `transfer_time`, in issue order, with demand loads ahead of every queued
  prefetch. A transfer that has started is never interrupted.
- A prefetch that s needs and that is still queued (not started) is promoted: it is served with the
  demand loads of s. A prefetch that s needs and that is in flight delays s until it arrives.
- Layer l starts when all its requested experts have arrived: at the latest of `ready`, the arrival of
  its last demand load and the arrival of the prefetches it needs. Hits are resident, so they add no
  wait. Its stall is start - ready, plus its host wait (below).
- The prefetches of s are issued at `ready`, behind the demand loads of s, so they overlap the wait
  and the compute of layer l. Queued prefetches keep the link busy across layer and pass boundaries.

With no prefetches the link is idle whenever a layer is reached, so a layer with n misses stalls for
exactly n x transfer_time.

With `host_compute`, the host CPU computes some experts of a layer (misses not loaded) while the
accelerator computes the rest: both start when the layer starts, and the layer ends when both are
done, after max(compute, host_compute). The excess, max(0, host_compute - compute), is the layer's
host wait and counts as stall.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

TRANSFER_DEMAND = 0
TRANSFER_PREFETCH = 1
NO_CONSUMER = -1
"""Consumer step of a prefetch that no later step uses (a wasted transfer)."""

TRANSFER_LOG_DTYPE = np.dtype([
    ("kind", np.int8),  # TRANSFER_DEMAND or TRANSFER_PREFETCH
    ("issue_step", np.int64),  # global step that issued the transfer
    ("consumer_step", np.int64),  # global step that needs the expert, or NO_CONSUMER
    ("issue_time", np.float64),
    ("start_time", np.float64),
    ("end_time", np.float64),
])

PrefetchPlan = Mapping[int, Sequence[int]] | Sequence[Sequence[int]]
"""Prefetches issued at the start of each step: for a global step s, the consumer step of each
transfer (the step that first requests the prefetched expert, later than s) or `NO_CONSUMER`, in
issue order. Either a sequence of T x L entries or a mapping from s to its list (absent steps issue none)."""


@dataclasses.dataclass(frozen=True, eq=False)  # numpy fields: compare the summaries instead
class Timeline:
    """Times of every pass and step, in the unit of the inputs (seconds for `estimate_timing`).

    Attributes:
      pass_start, pass_time: float64 [T], when each pass began and how long it took.
      layer_ready: float64 [T, L], when each layer could have started (the end of what ran before it).
      layer_start, layer_end: float64 [T, L].
      transfers: one TRANSFER_LOG_DTYPE record per transfer in start order, or None when not recorded.
      host_wait: float64 [T, L], time each layer's end waited for the host beyond the accelerator's
        compute, max(0, host_compute - compute); None means zeros.
    """

    pass_start: np.ndarray
    pass_time: np.ndarray
    layer_ready: np.ndarray
    layer_start: np.ndarray
    layer_end: np.ndarray
    transfers: np.ndarray | None = None
    host_wait: np.ndarray | None = None

    @property
    def stall(self) -> np.ndarray:
        """float64 [T, L], time each layer waited for its experts: transfers before it started, plus its host wait."""
        stall = self.layer_start - self.layer_ready
        if self.host_wait is not None:
            stall = stall + self.host_wait
        return stall

    @property
    def total_stall(self) -> float:
        return float(self.stall.sum())

    @property
    def total_time(self) -> float:
        """End of the last pass (the timeline starts at 0)."""
        return float(self.pass_start[-1] + self.pass_time[-1])

    @property
    def late_prefetches(self) -> int:
        """Prefetches with a consumer that arrived after the consumer's layer was reached (after its `layer_ready`).

        A promoted prefetch counts as late when its transfer took any time. Raises ValueError when the
        transfers were not recorded.
        """
        if self.transfers is None:
            raise ValueError("late_prefetches needs the transfer log: simulate with record_transfers=True")
        log = self.transfers
        used = log[(log["kind"] == TRANSFER_PREFETCH) & (log["consumer_step"] != NO_CONSUMER)]
        reached = self.layer_ready.reshape(-1)[used["consumer_step"]]
        return int(np.count_nonzero(used["end_time"] > reached))


def _per_pass(values: np.ndarray | None, num_passes: int, field: str) -> np.ndarray:
    if values is None:
        return np.zeros(num_passes)
    values = np.asarray(values, np.float64)
    if values.shape != (num_passes,):
        raise ValueError(f"{field}: expected shape ({num_passes},) (one entry per pass), got {values.shape}")
    if not np.all(np.isfinite(values) & (values >= 0)):
        raise ValueError(f"{field}: expected finite times >= 0, got a minimum of {values.min()}")
    return values


def _per_step(values: np.ndarray | None, shape: tuple[int, int], field: str) -> np.ndarray | None:
    if values is None:
        return None
    values = np.asarray(values, np.float64)
    if values.shape != shape:
        raise ValueError(f"{field}: expected shape {shape} (one entry per pass and layer), got {values.shape}")
    invalid = ~(np.isfinite(values) & (values >= 0))
    if invalid.any():
        p, l = np.argwhere(invalid)[0]
        raise ValueError(f"{field}: expected finite times >= 0, got {values[p, l]} at pass {p}, layer {l}")
    return values


def _prefetch_lists(prefetches: PrefetchPlan | None, num_steps: int) -> list[list[int]]:
    """Check `prefetches` and return one list of consumer steps per global step."""
    lists: list[list[int]] = [[] for _ in range(num_steps)]
    if prefetches is None:
        return lists
    if isinstance(prefetches, Mapping):
        items = list(prefetches.items())
    else:
        if len(prefetches) != num_steps:
            raise ValueError(f"prefetches: expected {num_steps} entries (one per step), got {len(prefetches)}")
        items = list(enumerate(prefetches))
    for step, consumers in items:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step < num_steps:
            raise ValueError(f"prefetches: expected a step index in [0, {num_steps}), got {step!r}")
        for consumer in consumers:
            consumer = int(consumer)
            if consumer != NO_CONSUMER and not step < consumer < num_steps:
                raise ValueError(
                    f"prefetches[{step}]: expected consumer steps in ({step}, {num_steps}) or {NO_CONSUMER} "
                    f"(unused), got {consumer}; a step's own misses are demand loads, not prefetches"
                )
            lists[int(step)].append(consumer)
    return lists


class _Link:
    """The host-to-device link: one transfer at a time, demand loads ahead of queued prefetches."""

    def __init__(self, transfer_time: float, record: bool):
        self.transfer_time = transfer_time
        self.free_at = 0.0
        self.queue: collections.deque[tuple[int, float, int]] = collections.deque()  # (issue step, issue time, consumer)
        self.queued_for: collections.Counter[int] = collections.Counter()
        self.arrival: dict[int, float] = {}  # latest arrival of the started prefetches each step needs
        self.log: list[tuple] | None = [] if record else None

    def start_prefetches_before(self, time: float) -> None:
        """Start, in issue order, every queued prefetch that the link can begin before `time`."""
        while self.queue:
            issue_step, issue_time, consumer = self.queue[0]
            start = max(self.free_at, issue_time)
            if start >= time:
                return
            self.queue.popleft()
            self.queued_for[consumer] -= 1
            self.free_at = start + self.transfer_time
            if consumer != NO_CONSUMER:
                self.arrival[consumer] = max(self.arrival.get(consumer, 0.0), self.free_at)
            if self.log is not None:
                self.log.append((TRANSFER_PREFETCH, issue_step, consumer, issue_time, start, self.free_at))

    def serve_demand(self, step: int, time: float, num_loads: int) -> float:
        """Serve `num_loads` demand loads and the queued prefetches that `step` needs; return when all arrived."""
        promoted = [entry for entry in self.queue if entry[2] == step] if self.queued_for[step] else []
        if promoted:
            self.queue = collections.deque(entry for entry in self.queue if entry[2] != step)
            self.queued_for[step] = 0
        arrival = self.arrival.pop(step, time)
        count = num_loads + len(promoted)
        if count == 0:
            return max(arrival, time)
        start = max(self.free_at, time)
        self.free_at = start + count * self.transfer_time
        if self.log is not None:
            kinds = [(TRANSFER_DEMAND, step, time)] * num_loads + [(TRANSFER_PREFETCH, e[0], e[1]) for e in promoted]
            for index, (kind, issue_step, issue_time) in enumerate(kinds):
                begin = start + index * self.transfer_time
                self.log.append((kind, issue_step, step, issue_time, begin, begin + self.transfer_time))
        return max(arrival, self.free_at, time)

    def issue_prefetches(self, step: int, time: float, consumers: list[int]) -> None:
        for consumer in consumers:
            self.queue.append((step, time, consumer))
            self.queued_for[consumer] += 1


def simulate_timeline(
    compute: np.ndarray,
    demand_loads: np.ndarray,
    transfer_time: float,
    *,
    prefetches: PrefetchPlan | None = None,
    host_compute: np.ndarray | None = None,
    prologue: np.ndarray | None = None,
    epilogue: np.ndarray | None = None,
    record_transfers: bool = False,
) -> Timeline:
    """Simulate the compute and transfer timeline that the module docstring describes.

    Args:
      compute: float [T, L], compute time of each MoE layer in each pass.
      demand_loads: int [T, L], misses of each step, each one whole-expert transfer.
      transfer_time: time one transfer occupies the link (latency + bytes / bandwidth); 0 makes
        transfers free.
      prefetches: transfers issued at the start of each step (see `PrefetchPlan`); None issues none.
      host_compute: float [T, L], time the host CPU takes for the experts it computes at each step,
        in parallel with `compute`; None means the host computes nothing.
      prologue, epilogue: float [T], compute before the first MoE layer (dense layers) and after the
        last one (LM head) of each pass; zeros when None.
      record_transfers: also return the log of every transfer.
    """
    compute = np.asarray(compute, np.float64)
    if compute.ndim != 2:
        raise ValueError(f"compute: expected shape (passes, layers), got {compute.shape}")
    T, L = compute.shape
    if T < 1 or L < 1:
        raise ValueError(f"compute: expected at least one pass and one layer, got shape {compute.shape}")
    if not np.all(np.isfinite(compute) & (compute >= 0)):
        raise ValueError("compute: expected finite times >= 0")
    demand_loads = np.asarray(demand_loads)
    if demand_loads.shape != (T, L) or demand_loads.dtype.kind not in "iu" or (demand_loads < 0).any():
        raise ValueError(f"demand_loads: expected non-negative integers of shape {(T, L)}, got {demand_loads.dtype} {demand_loads.shape}")
    transfer_time = float(transfer_time)
    if not np.isfinite(transfer_time) or transfer_time < 0:
        raise ValueError(f"transfer_time: expected a finite time >= 0, got {transfer_time}")
    prologue = _per_pass(prologue, T, "prologue")
    epilogue = _per_pass(epilogue, T, "epilogue")
    host_compute = _per_step(host_compute, (T, L), "host_compute")
    prefetch_lists = _prefetch_lists(prefetches, T * L)
    # The accelerator and the host work on the layer side by side; the slower one sets its length.
    layer_time = compute if host_compute is None else np.maximum(compute, host_compute)
    host_wait = np.zeros((T, L)) if host_compute is None else layer_time - compute

    link = _Link(transfer_time, record_transfers)
    pass_start = np.zeros(T)
    pass_time = np.zeros(T)
    layer_ready = np.zeros((T, L))
    layer_start = np.zeros((T, L))
    layer_end = np.zeros((T, L))
    clock = 0.0
    for p in range(T):
        pass_start[p] = clock
        clock += prologue[p]
        for l in range(L):
            step = p * L + l
            # Prefetches that could begin before this layer was reached hold the link first.
            link.start_prefetches_before(clock)
            arrival = link.serve_demand(step, clock, int(demand_loads[p, l]))
            link.issue_prefetches(step, clock, prefetch_lists[step])
            layer_ready[p, l] = clock
            layer_start[p, l] = arrival
            layer_end[p, l] = arrival + layer_time[p, l]
            clock = layer_end[p, l]
        clock += epilogue[p]
        pass_time[p] = clock - pass_start[p]

    transfers = None
    if record_transfers:
        # Prefetches still queued when the last pass ends run after it. They change no time, but then the
        # log contains every issued transfer.
        link.start_prefetches_before(math.inf)
        transfers = np.array(link.log, dtype=TRANSFER_LOG_DTYPE)
        transfers = transfers[np.argsort(transfers["start_time"], kind="stable")]
    return Timeline(pass_start, pass_time, layer_ready, layer_start, layer_end, transfers, host_wait)

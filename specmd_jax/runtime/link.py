"""Host-to-device expert transfers with `jax.device_put`, optionally over an emulated link.

`jax.device_put` dispatches asynchronously, so a transfer overlaps whatever runs after it is issued,
and `Link.wait` blocks only on the transfers a layer needs.

An emulated link (`bandwidth` set) delays each transfer's completion to the time a serial link of that
bandwidth would finish it, with the rules of the timing model (`specmd_jax.timing.timeline`):
- one whole-expert transfer at a time, each taking `latency + bytes / bandwidth` seconds;
- demand loads go ahead of every prefetch that has not started; a started transfer is never interrupted;
- a queued prefetch that a step needs is promoted and served right after that step's demand loads.
The data itself moves as fast as `device_put` moves it; only its availability is delayed. On CPU,
where host and device share memory, this makes the measured times comparable with the timing model.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from specmd_jax.timing.timeline import NO_CONSUMER, TRANSFER_DEMAND, TRANSFER_PREFETCH

# Sleeping hands the core to other threads but may wake late, so the last stretch of a wait spins instead.
SPIN_SECONDS = 0.0005


@dataclasses.dataclass(eq=False)
class Transfer:
    """One expert on its way to a cache slot.

    Attributes:
      flat_id, slot: the item and the slot it will occupy.
      kind: `TRANSFER_DEMAND` or `TRANSFER_PREFETCH`.
      issue_step: the global step that issued it.
      arrays: the device arrays `jax.device_put` returned, one per weight kind.
      num_bytes: bytes moved.
      issue_time: `Link.clock` time at which the device_put calls of its batch had returned.
      start_time, end_time: emulated link occupation; None without emulation, or while queued.
      consumer_step: the first step that requested the item after the transfer, or `NO_CONSUMER`.
    """

    flat_id: int
    slot: int
    kind: int
    issue_step: int
    arrays: tuple[jax.Array, ...]
    num_bytes: int
    issue_time: float
    start_time: float | None = None
    end_time: float | None = None
    consumer_step: int = NO_CONSUMER


class Link:
    """Issue transfers to `device` and wait for them, on a real or an emulated link.

    Args:
      device: the device of the expert cache.
      bandwidth: emulated link bandwidth in bytes/s, or None to use the real transfers as they are.
      latency: fixed cost of each emulated transfer, seconds (ignored without emulation).
      clock: seconds, monotonic; `time.perf_counter` unless a test replaces it.
      sleep: waits a number of seconds; `time.sleep` unless a test replaces it.
    """

    def __init__(
        self,
        device: jax.Device,
        bandwidth: float | None = None,
        latency: float = 0.0,
        *,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if bandwidth is not None and (isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)) or not bandwidth > 0 or math.isnan(bandwidth)):
            raise ValueError(f"bandwidth: expected bytes per second > 0 or None (no emulation), got {bandwidth!r}")
        if isinstance(latency, bool) or not isinstance(latency, (int, float)) or not math.isfinite(latency) or latency < 0:
            raise ValueError(f"latency: expected a finite number of seconds >= 0, got {latency!r}")
        self.device = device
        self.bandwidth = None if bandwidth is None or math.isinf(bandwidth) else float(bandwidth)
        self.latency = float(latency) if self.bandwidth is not None else 0.0
        self.clock = clock
        self.sleep = sleep
        self.free_at = -math.inf
        self.queue: collections.deque[Transfer] = collections.deque()  # prefetches not started yet
        self.log: list[Transfer] = []

    @property
    def emulated(self) -> bool:
        return self.bandwidth is not None

    def transfer_seconds(self, num_bytes: int) -> float:
        """Emulated link time of one transfer; 0 without emulation."""
        if self.bandwidth is None:
            return 0.0
        return self.latency + num_bytes / self.bandwidth

    def _send(self, flat_id: int, slot: int, kind: int, step: int, host_arrays: Sequence[np.ndarray]) -> Transfer:
        arrays = tuple(jax.device_put(array, self.device) for array in host_arrays)
        transfer = Transfer(
            flat_id=int(flat_id), slot=int(slot), kind=kind, issue_step=int(step), arrays=arrays,
            num_bytes=sum(int(array.nbytes) for array in host_arrays), issue_time=math.nan,
        )
        self.log.append(transfer)
        return transfer

    def _stamp(self, transfers: list[Transfer]) -> float:
        # Transfers count as issued once every device_put call has returned, so the host time of
        # the calls adds to a transfer's time rather than hiding inside the emulated link time.
        now = self.clock()
        for transfer in transfers:
            transfer.issue_time = now
        return now

    def _start_queued_before(self, time_limit: float) -> None:
        """Start, in issue order, every queued prefetch that the emulated link can begin before `time_limit`."""
        while self.queue:
            transfer = self.queue[0]
            start = max(self.free_at, transfer.issue_time)
            if start >= time_limit:
                return
            self.queue.popleft()
            self._occupy(transfer, start)

    def _occupy(self, transfer: Transfer, start: float) -> None:
        transfer.start_time = start
        transfer.end_time = start + self.transfer_seconds(transfer.num_bytes)
        self.free_at = transfer.end_time

    def issue_demand(
        self, step: int, loads: Sequence[tuple[int, int, Sequence[np.ndarray]]], needed: Sequence[Transfer]
    ) -> list[Transfer]:
        """Issue the demand loads of `step`, given as (flat id, slot, host arrays), and promote what it needs.

        `needed` are earlier transfers of items that `step` requests; those still queued on the emulated
        link are served right after the demand loads. Returns the new transfers.
        """
        transfers = [self._send(flat_id, slot, TRANSFER_DEMAND, step, arrays) for flat_id, slot, arrays in loads]
        now = self._stamp(transfers)
        if not self.emulated:
            return transfers
        self._start_queued_before(now)
        waiting = {id(transfer) for transfer in needed}
        promoted = [transfer for transfer in self.queue if id(transfer) in waiting]
        if promoted:
            self.queue = collections.deque(transfer for transfer in self.queue if id(transfer) not in waiting)
        for transfer in [*transfers, *promoted]:
            self._occupy(transfer, max(self.free_at, now))
        return transfers

    def issue_prefetches(self, step: int, loads: Sequence[tuple[int, int, Sequence[np.ndarray]]]) -> list[Transfer]:
        """Issue prefetches of `step`, given as (flat id, slot, host arrays), behind everything issued before."""
        transfers = [self._send(flat_id, slot, TRANSFER_PREFETCH, step, arrays) for flat_id, slot, arrays in loads]
        self._stamp(transfers)
        if self.emulated:
            self.queue.extend(transfers)
        return transfers

    def wait(self, transfers: Sequence[Transfer]) -> float:
        """Block until every transfer in `transfers` has arrived; return the seconds spent waiting.

        Every transfer must have started on an emulated link (`issue_demand` promotes queued ones).
        """
        if not transfers:
            return 0.0
        began = self.clock()
        if self.emulated:
            unstarted = [t.flat_id for t in transfers if t.end_time is None]
            if unstarted:
                raise RuntimeError(f"items {unstarted} are still queued on the link; issue_demand must promote them first")
            arrival = max(t.end_time for t in transfers)
            while (remaining := arrival - self.clock()) > 0:
                if remaining > SPIN_SECONDS:
                    self.sleep(remaining - SPIN_SECONDS)
        jax.block_until_ready([t.arrays for t in transfers])
        return self.clock() - began

    def finish(self) -> None:
        """Give every prefetch still queued its emulated link time, so the log covers every transfer."""
        self._start_queued_before(math.inf)

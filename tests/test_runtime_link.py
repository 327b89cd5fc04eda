"""Tests of the runtime's parts: the emulated link, the slot cache, host experts and the timing-model comparison."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from flax import nnx

from specmd_jax.model import ModelConfig, MoeTransformer
from specmd_jax.runtime import HostExperts, Link, OffloadedModel, SlotCache, offloaded_generate
from specmd_jax.runtime.generate import median_run
from specmd_jax.runtime.timing import fit_compute, model_shape_for, modelled_timing, prefetch_plan, relative_error
from specmd_jax.timing.timeline import NO_CONSUMER, TRANSFER_DEMAND, TRANSFER_PREFETCH

DEVICE = jax.devices()[0]


class FakeClock:
    """A clock that advances by `tick` on every read and by the requested time on every sleep."""

    def __init__(self, tick: float = 1e-4):
        self.now = 0.0
        self.tick = tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def expert(num_bytes: int) -> tuple[np.ndarray]:
    return (np.zeros(num_bytes // 4, np.float32),)


def test_emulated_link_follows_timing_rules():
    clock = FakeClock(tick=0.0)
    # 1000 bytes at 1000 B/s plus 0.5 s latency: every transfer occupies the link for 1.5 s.
    link = Link(DEVICE, bandwidth=1000.0, latency=0.5, clock=clock, sleep=clock.sleep)
    assert link.transfer_seconds(1000) == pytest.approx(1.5)

    # t = 0: two prefetches queue, then a demand load goes ahead of both and occupies [0, 1.5].
    first, second = link.issue_prefetches(0, [(10, 0, expert(1000)), (11, 1, expert(1000))])
    (demand,) = link.issue_demand(1, [(12, 2, expert(1000))], needed=[])
    assert (demand.start_time, demand.end_time) == pytest.approx((0.0, 1.5))
    assert first.start_time is None
    assert second.start_time is None

    # t = 2: the first prefetch could start at 1.5, before 2, so it runs [1.5, 3.0]. The second is still
    # queued, and a step that needs it promotes it behind that step's demand load: [3.0, 4.5], then [4.5, 6.0].
    clock.now = 2.0
    (late,) = link.issue_demand(2, [(13, 3, expert(1000))], needed=[second])
    assert (first.start_time, first.end_time) == pytest.approx((1.5, 3.0))
    assert (late.start_time, late.end_time) == pytest.approx((3.0, 4.5))
    assert (second.start_time, second.end_time) == pytest.approx((4.5, 6.0))
    assert not link.queue

    # The wait lasts until the later of the two arrivals. Its last stretch spins on the clock, so the clock must advance.
    clock.tick = 1e-5
    assert link.wait([late, second]) == pytest.approx(4.0, abs=1e-3)
    assert [t.kind for t in link.log] == [TRANSFER_PREFETCH, TRANSFER_PREFETCH, TRANSFER_DEMAND, TRANSFER_DEMAND]


def test_emulated_link_finish_schedules_queue():
    clock = FakeClock(tick=0.0)
    link = Link(DEVICE, bandwidth=100.0, clock=clock, sleep=clock.sleep)
    transfers = link.issue_prefetches(0, [(1, 0, expert(100)), (2, 1, expert(100))])
    link.finish()
    assert [(t.start_time, t.end_time) for t in transfers] == [pytest.approx((0.0, 1.0)), pytest.approx((1.0, 2.0))]


def test_wait_on_queued_transfer_rejected():
    link = Link(DEVICE, bandwidth=100.0)
    (queued,) = link.issue_prefetches(0, [(1, 0, expert(100))])
    with pytest.raises(RuntimeError, match="still queued"):
        link.wait([queued])


def test_emulated_wait_real_clock():
    # 40,000 bytes at 2 MB/s: the data is there at once, but the wait lasts 20 ms.
    link = Link(DEVICE, bandwidth=2e6)
    transfers = link.issue_demand(0, [(0, 0, expert(40_000))], needed=[])
    waited = link.wait(transfers)
    assert waited >= 0.019
    assert transfers[0].arrays[0].is_ready()


def test_free_link_has_no_schedule():
    link = Link(DEVICE)
    (transfer,) = link.issue_demand(0, [(5, 0, expert(64))], needed=[])
    assert link.wait([transfer]) >= 0.0
    assert transfer.start_time is None
    assert transfer.end_time is None
    assert transfer.consumer_step == NO_CONSUMER
    assert link.transfer_seconds(10**9) == 0.0
    assert Link(DEVICE, bandwidth=math.inf).emulated is False


@pytest.mark.parametrize("bandwidth", [0.0, -1.0, math.nan, True])
def test_link_rejects_bad_bandwidth(bandwidth):
    with pytest.raises(ValueError, match="bandwidth"):
        Link(DEVICE, bandwidth=bandwidth)


def test_link_rejects_negative_latency():
    with pytest.raises(ValueError, match="latency"):
        Link(DEVICE, bandwidth=1.0, latency=-1.0)


CONFIG = ModelConfig(
    name="link-test", vocab_size=40, hidden_size=16, num_layers=3, num_heads=2, num_kv_heads=2, head_dim=8,
    num_experts=8, top_k=2, expert_hidden_size=8, dense_layers=(0,), dense_hidden_size=16, max_seq_len=32,
)
PROMPT = np.array([[2, 7, 1, 8, 2]], np.int32)


@pytest.fixture(scope="module")
def model():
    return MoeTransformer(CONFIG, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def offloaded(model):
    return OffloadedModel(model)


def test_host_experts_copy_model(model):
    host = HostExperts.from_model(model)
    assert (host.num_layers, host.num_experts) == (2, 8)
    assert host.expert_bytes == 3 * 16 * 8 * 4
    gate, up, down = host.expert(1 * 8 + 5)
    np.testing.assert_array_equal(gate, np.asarray(model.moe_blocks()[1].gate_proj[...][5]))
    np.testing.assert_array_equal(down, np.asarray(model.moe_blocks()[1].down_proj[...][5]))
    with pytest.raises(ValueError, match="flat id 16"):
        host.expert(16)


def test_host_experts_reject_writeable_arrays():
    arrays = tuple(np.zeros((1, 2, 3, 4), np.float32) for _ in range(3))
    with pytest.raises(ValueError, match="read-only"):
        HostExperts(arrays)


def test_slot_cache_assign_release_write(model):
    host = HostExperts.from_model(model)
    cache = SlotCache(host, 3, DEVICE)
    assert [cache.assign(f) for f in (9, 2, 15)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="no free slot"):
        cache.assign(4)
    assert cache.release(2) == 1
    assert cache.assign(4) == 1
    assert cache.resident_items().tolist() == [4, 9, 15]
    assert cache.table_row(1).tolist() == [-1, 0, -1, -1, -1, -1, -1, 2]
    with pytest.raises(RuntimeError, match="owns no slot"):
        cache.release(2)

    cache.write(1, tuple(jax.device_put(array, DEVICE) for array in host.expert(4)))
    for slots, array in zip(cache.slots, host.expert(4)):
        np.testing.assert_array_equal(np.asarray(slots[1]), array)
        assert not np.asarray(slots[0]).any()


@pytest.mark.parametrize("slots", [0, 17, 2.5])
def test_slot_cache_rejects_bad_size(model, slots):
    with pytest.raises(ValueError, match="num_slots"):
        SlotCache(HostExperts.from_model(model), slots, DEVICE)


def test_model_shape_matches_config(offloaded):
    shape = model_shape_for(CONFIG)
    assert (shape.num_layers, shape.num_dense_layers, shape.num_moe_layers) == (3, 1, 2)
    assert shape.expert_bytes == offloaded.host.expert_bytes
    assert shape.dtype_bytes == 4
    with pytest.raises(ValueError, match="dense layers before the MoE layers"):
        model_shape_for(CONFIG.replace(dense_layers=(1,)))


def test_fit_reproduces_calibration_run(offloaded):
    offloaded_generate(offloaded, PROMPT, 4, policy="lru", capacity=8)  # compiles every piece
    calibration = offloaded_generate(offloaded, PROMPT, 4, policy="lru", capacity=8)
    fit = fit_compute(calibration, model_shape_for(CONFIG))
    # One prefill pass and three decode passes: TTFT covers the first two passes.
    assert fit.tpot == pytest.approx(calibration.pass_time[1:].mean(), rel=0.02)
    if not fit.at_bound:
        assert fit.ttft == pytest.approx(calibration.pass_time[:2].sum(), rel=0.02)
    assert calibration.ttft == pytest.approx(calibration.pass_time[:2].sum())

    emulated = offloaded_generate(offloaded, PROMPT, 4, policy="lru", capacity=8, link=Link(DEVICE, 1e6))
    with pytest.raises(ValueError, match="free link"):
        fit_compute(emulated, model_shape_for(CONFIG))


def test_emulated_run_waits_for_link(offloaded):
    # 384-byte experts at 0.2 MB/s take 1.92 ms each. Without prefetches every demand load is waited
    # for in full, so the stall and host transfer time together cover nearly every link second.
    bandwidth = 2e5
    run = offloaded_generate(offloaded, PROMPT, 4, policy="fifo", capacity=8, link=Link(DEVICE, bandwidth))
    link_seconds = len(run.transfers) * run.expert_bytes / bandwidth
    assert run.transfer_time.sum() >= 0.9 * link_seconds
    assert run.total_stall <= run.transfer_time.sum()


def test_modelled_timing_uses_run_prefetches(offloaded):
    recorded = offloaded_generate(offloaded, PROMPT, 4, policy="lru", capacity=8)
    run = offloaded_generate(
        offloaded, PROMPT, 4, policy="lru", capacity=8, replay=recorded.trace, prefetch="oracle", link=Link(DEVICE, 1e6),
    )
    plan = prefetch_plan(run)
    issued = sum(len(consumers) for consumers in plan.values())
    assert issued == sum(record.prefetched.size for record in run.records) > 0
    for step, consumers in plan.items():
        assert all(consumer == NO_CONSUMER or consumer > step for consumer in consumers)

    shape = model_shape_for(CONFIG)
    fit = fit_compute(recorded, shape)
    modelled = modelled_timing(run, fit.hardware(1e6), shape)
    assert modelled.prefetches == issued
    assert modelled.demand_loads == run.requests - run.hits
    assert modelled.transfer_time == pytest.approx(run.expert_bytes / 1e6)
    assert fit.hardware(1e6, 2e-6).transfer_latency == 2e-6


def test_median_run_combines_repeats(offloaded):
    runs = [offloaded_generate(offloaded, PROMPT, 3, policy="lru", capacity=8) for _ in range(3)]
    combined = median_run(runs)
    np.testing.assert_array_equal(combined.pass_time, np.median([run.pass_time for run in runs], axis=0))
    assert combined.records[2].stall == np.median([run.records[2].stall for run in runs])
    assert combined.records[2].outcomes.tolist() == runs[0].records[2].outcomes.tolist()

    # With all 16 items cached nothing is evicted, so the decisions differ from the 8-slot runs.
    other = offloaded_generate(offloaded, PROMPT, 3, policy="lru", capacity=16)
    with pytest.raises(ValueError, match="other decisions"):
        median_run([runs[0], other])


def test_relative_error():
    assert relative_error(1.1, 1.0) == pytest.approx(0.1)
    assert relative_error(None, 1.0) is None
    assert relative_error(1.0, 0.0) is None

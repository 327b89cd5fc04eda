"""Tests of the timing model with prefetching and host misses: host figures, late and wasted prefetches,
the prefetch plan read from simulator events, host compute, and the identities they must meet."""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest

from specmd_jax.prefetch.registry import PrefetchConfig
from specmd_jax.sim import SimConfig, build_requests, run_sweep
from specmd_jax.timing import (
    HARDWARE_PRESETS,
    NO_CONSUMER,
    Hardware,
    ModelShape,
    estimate_timing,
    get_hardware,
    prefetch_plan_from_events,
    simulate_timeline,
)
from specmd_jax.timing.compute import host_experts_time, routed_experts_time
from specmd_jax.timing.events import host_expert_pairs, miss_slots
from specmd_jax.timing.timeline import TRANSFER_DEMAND, TRANSFER_PREFETCH
from specmd_jax.traces import PASS_DECODE, PASS_PREFILL, TraceMetadata, make_trace

# Tiny shapes, so every figure can be checked by hand: 2 MoE layers of 8 experts, top-2.
TINY_MODEL = ModelShape(
    name="tiny", num_layers=2, num_experts=8, top_k=2, hidden=64, expert_ffn=32,
    num_heads=4, num_kv_heads=4, head_dim=16, vocab_size=256,
)
# 2 MoE layers of 4 experts, top-1: the hand-built trace below.
HAND_MODEL = ModelShape(
    name="hand", num_layers=2, num_experts=4, top_k=1, hidden=64, expert_ffn=32,
    num_heads=4, num_kv_heads=4, head_dim=16, vocab_size=256,
)
HOST_FIGURES = {"host_flops": 1e10, "host_memory_bandwidth": 1e9}
SLOW_LINK = Hardware("slow-link", 1e12, 1e11, link_bandwidth=1e8, transfer_latency=1e-5, **HOST_FIGURES)
FREE_LINK = Hardware("free-link", 1e12, 1e11, link_bandwidth=math.inf, transfer_latency=0.0, **HOST_FIGURES)


def tiny_trace(prompt_tokens: int = 4, decode_tokens: int = 6, sequences: int = 2, seed: int = 0):
    """Random top-2 routing over 2 layers x 8 experts: each sequence is one prefill pass then decode passes."""
    rng = np.random.default_rng(seed)
    num_tokens = sequences * (prompt_tokens + decode_tokens)
    ids = np.stack([np.stack([rng.choice(8, size=2, replace=False) for _ in range(2)]) for _ in range(num_tokens)])
    offsets, kinds, sequence_ids = [0], [], []
    for sequence in range(sequences):
        offsets.append(offsets[-1] + prompt_tokens)
        kinds.append(PASS_PREFILL)
        sequence_ids.append(sequence)
        for _ in range(decode_tokens):
            offsets.append(offsets[-1] + 1)
            kinds.append(PASS_DECODE)
            sequence_ids.append(sequence)
    metadata = TraceMetadata("tiny", num_layers=2, num_experts=8, top_k=2, source="test")
    return make_trace(ids, metadata, pass_offsets=np.asarray(offsets), pass_kind=np.asarray(kinds),
                      pass_sequence=np.asarray(sequence_ids))


def hand_trace():
    """Three one-token decode passes over 2 layers x 4 experts, top-1.

    Steps s = 2p + l request: s0 expert 0 (flat id 0), s1 expert 1 (flat 5), s2 expert 2 (flat 2),
    s3 expert 1 (flat 5), s4 expert 0 (flat 0), s5 expert 3 (flat 7).
    """
    ids = np.array([[[0], [1]], [[2], [1]], [[0], [3]]])
    return make_trace(ids, TraceMetadata("hand", num_layers=2, num_experts=4, top_k=1, source="test"))


def hand_score_table() -> np.ndarray:
    """A `learned` score table [T=3, L=2, D=1, E=4] whose top-2 picks are written out in the test."""
    table = np.zeros((3, 2, 1, 4), np.float32)
    table[0, 0, 0, [1, 3]] = [2.0, 1.0]  # s0 -> s1 (layer 1): expert 1 first, then expert 3
    table[0, 1, 0, 2] = 1.0  # s1 -> s2 (layer 0): expert 2
    table[1, 0, 0, 2] = 1.0  # s2 -> s3 (layer 1): expert 2, which no step requests
    table[1, 1, 0, 0] = 1.0  # s3 -> s4 (layer 0): expert 0
    table[2, 0, 0, 3] = 1.0  # s4 -> s5 (layer 1): expert 3
    return table


def simulate(trace, config: SimConfig, **sweep_options):
    results, events = run_sweep(trace, [config], record_events=True, **sweep_options)
    return results[0], events[config]


# ------------------------------------------------------------------------------------------------
# Host figures of the hardware
# ------------------------------------------------------------------------------------------------

def test_host_figures_default_to_none():
    hardware = Hardware("no-host", 1e12, 1e11, 1e9, 1e-5)
    assert hardware.host_flops is None
    assert hardware.host_memory_bandwidth is None
    assert not hardware.has_host_compute
    # The source stays the sixth positional field.
    assert Hardware("labelled", 1e12, 1e11, 1e9, 1e-5, "a source").source == "a source"


@pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf, True, "1e9"])
def test_invalid_host_figure_rejected(value):
    with pytest.raises(ValueError, match="Hardware.host_flops: expected a finite number > 0 or None"):
        Hardware("bad", 1e12, 1e11, 1e9, 0.0, host_flops=value, host_memory_bandwidth=1e9)
    with pytest.raises(ValueError, match="Hardware.host_memory_bandwidth: expected a finite number > 0 or None"):
        Hardware("bad", 1e12, 1e11, 1e9, 0.0, host_flops=1e9, host_memory_bandwidth=value)


def test_one_host_figure_rejected():
    with pytest.raises(ValueError, match="both host_flops and host_memory_bandwidth or neither"):
        Hardware("bad", 1e12, 1e11, 1e9, 0.0, host_flops=1e9)


@pytest.mark.parametrize("name", sorted(HARDWARE_PRESETS))
def test_preset_host_figures(name):
    hardware = HARDWARE_PRESETS[name]
    assert hardware.has_host_compute
    # A host CPU is slower than the accelerator beside it on both bounds.
    assert 1e11 < hardware.host_flops < hardware.peak_flops
    assert 1e10 < hardware.host_memory_bandwidth < hardware.memory_bandwidth
    assert "host" in hardware.source


def test_a100_host_figures_by_hand():
    a100 = get_hardware("pcie4-a100")
    # One EPYC 7742: 64 cores x 2.25 GHz x 2 FMA units x 8 FP32 lanes x 2 FLOPs = 4.608 TFLOPS; eight
    # DDR4-3200 channels x 8 bytes = 204.8 GB/s.
    assert a100.host_flops == pytest.approx(4.608e12)
    assert a100.host_memory_bandwidth == pytest.approx(204.8e9)


def test_host_expert_time_roofline():
    olmoe_like = ModelShape("olmoe-like", 16, 64, 8, 2048, 1024, 16, 16, 128, 50304)
    a100 = get_hardware("pcie4-a100")
    # One decode token on 3 missed experts: reading 3 x 12,582,912 bytes at 204.8 GB/s (184 us) bounds
    # it, not the 3 x 6 x 2048 x 1024 FLOPs at 4.6 TFLOPS (8 us).
    assert host_experts_time(olmoe_like, a100, np.array([3.0]), np.array([3.0]))[0] == pytest.approx(3 * 12_582_912 / 204.8e9)
    # 4096 pairs over 64 experts: 4096 x 6 x 2048 x 1024 FLOPs at 4.6 TFLOPS (11.2 ms) bound it.
    seconds = host_experts_time(olmoe_like, a100, np.array([4096.0]), np.array([64.0]))[0]
    assert seconds == pytest.approx(4096 * 6 * 2048 * 1024 / 4.608e12)


def test_host_expert_time_needs_host_figures():
    bare = Hardware("bare", 1e12, 1e11, 1e9, 0.0)
    with pytest.raises(ValueError, match="hardware 'bare' has no host compute figures"):
        host_experts_time(TINY_MODEL, bare, np.ones(1), np.ones(1))


# ------------------------------------------------------------------------------------------------
# Timeline: late and wasted prefetches, host compute (times in ms, written as plain numbers)
# ------------------------------------------------------------------------------------------------

def test_late_and_wasted_prefetches_by_hand():
    compute = np.array([[3.0, 1.0, 1.0]])
    # Step 0 prefetches for step 1, then an expert no step uses; step 1 prefetches for step 2.
    plan = {0: [1, NO_CONSUMER], 1: [2]}
    timeline = simulate_timeline(compute, np.zeros((1, 3), int), 2.0, prefetches=plan, record_transfers=True)

    # Layer 0 runs 0 to 3. The first prefetch runs over [0, 2] and the wasted one over [2, 4].
    # Layer 1 is reached at 3, after its prefetch arrived at 2 (on time), and runs 3 to 4.
    # Step 1's prefetch is issued at 3 but the link is busy until 4. Layer 2 is reached at 4 with it
    # still queued, so it is promoted and runs over [4, 6]; layer 2 starts at 6 (stall 2, late).
    assert timeline.layer_ready.tolist() == [[0, 3, 4]]
    assert timeline.layer_start.tolist() == [[0, 3, 6]]
    assert timeline.stall.tolist() == [[0, 0, 2]]
    assert timeline.total_time == 7
    log = timeline.transfers
    assert log["kind"].tolist() == [TRANSFER_PREFETCH] * 3
    assert log["issue_step"].tolist() == [0, 0, 1]
    assert log["consumer_step"].tolist() == [1, NO_CONSUMER, 2]
    assert log["start_time"].tolist() == [0, 2, 4]
    assert log["end_time"].tolist() == [2, 4, 6]
    # Only the promoted prefetch arrived after its layer was reached; the wasted one has no consumer.
    assert timeline.late_prefetches == 1


def test_in_flight_prefetch_is_late():
    # A 3 ms prefetch issued at 0 for step 1 arrives at 3, after layer 1 was reached at 1: late.
    late = simulate_timeline(np.ones((1, 2)), np.zeros((1, 2), int), 3.0, prefetches={0: [1]}, record_transfers=True)
    assert late.stall.tolist() == [[0, 2]]
    assert late.late_prefetches == 1
    # A 1 ms prefetch arrives exactly when layer 1 is reached: on time.
    on_time = simulate_timeline(np.ones((1, 2)), np.zeros((1, 2), int), 1.0, prefetches={0: [1]}, record_transfers=True)
    assert on_time.stall.tolist() == [[0, 0]]
    assert on_time.late_prefetches == 0


def test_late_prefetches_need_the_log():
    timeline = simulate_timeline(np.ones((1, 2)), np.zeros((1, 2), int), 1.0, prefetches={0: [1]})
    with pytest.raises(ValueError, match="record_transfers=True"):
        timeline.late_prefetches


def test_queued_prefetch_logged_after_last_pass():
    # The second prefetch is still queued when the only pass ends at 1; it runs after it, over [2, 4],
    # without changing any time.
    timeline = simulate_timeline(
        np.ones((1, 1)), np.zeros((1, 1), int), 2.0, prefetches={0: [NO_CONSUMER, NO_CONSUMER]}, record_transfers=True
    )
    assert timeline.total_time == 1
    assert timeline.transfers["start_time"].tolist() == [0, 2]


def test_host_compute_by_hand():
    compute = np.ones((2, 2))
    host = np.array([[0.5, 3.0], [0.0, 2.0]])
    demand = np.array([[1, 0], [0, 0]])
    timeline = simulate_timeline(compute, demand, 2.0, host_compute=host)

    # Pass 0. Layer 0 loads one expert over [0, 2] and starts at 2; the host's 0.5 ms fits in the
    #         device's 1 ms, so it ends at 3 (stall 2). Layer 1 runs 3 to 6, as the host takes 3 ms
    #         (stall 2).
    # Pass 1. Layer 0 runs 6 to 7. Layer 1 runs 7 to 9 (host 2 ms, stall 1).
    assert timeline.layer_start.tolist() == [[2, 3], [6, 7]]
    assert timeline.layer_end.tolist() == [[3, 6], [7, 9]]
    assert timeline.host_wait.tolist() == [[0, 2], [0, 1]]
    assert timeline.stall.tolist() == [[2, 2], [0, 1]]
    assert timeline.total_time == 9
    assert timeline.total_stall == 5


def test_zero_host_compute_equals_resident():
    rng = np.random.default_rng(0)
    compute = rng.uniform(0.5, 2.0, size=(4, 3))
    plan = {0: [2, NO_CONSUMER], 4: [7]}
    for demand, transfer in ((np.zeros((4, 3), int), 0.0), (rng.integers(0, 3, size=(4, 3)), 0.7)):
        plain = simulate_timeline(compute, demand, transfer, prefetches=plan, prologue=np.full(4, 0.3))
        hosted = simulate_timeline(compute, demand, transfer, prefetches=plan, prologue=np.full(4, 0.3),
                                   host_compute=np.zeros((4, 3)))
        np.testing.assert_array_equal(hosted.layer_start, plain.layer_start)
        np.testing.assert_array_equal(hosted.layer_end, plain.layer_end)
        np.testing.assert_array_equal(hosted.stall, plain.stall)
        assert hosted.total_time == plain.total_time
    # Without transfers, that is the all-resident timeline: no stall at all.
    resident = simulate_timeline(compute, np.zeros((4, 3), int), 0.0, host_compute=np.zeros((4, 3)))
    assert resident.total_stall == 0
    assert resident.total_time == pytest.approx(compute.sum())


def test_host_stall_is_excess_over_compute():
    rng = np.random.default_rng(1)
    compute = rng.uniform(0.5, 2.0, size=(5, 4))
    host = rng.uniform(0.0, 3.0, size=(5, 4))
    prologue, epilogue = np.full(5, 0.25), np.full(5, 0.5)
    timeline = simulate_timeline(compute, np.zeros((5, 4), int), 1.0, host_compute=host, prologue=prologue, epilogue=epilogue)
    excess = np.maximum(0.0, host - compute)
    np.testing.assert_allclose(timeline.stall, excess, atol=1e-12)
    assert timeline.total_stall == pytest.approx(excess.sum())
    assert timeline.total_time == pytest.approx(np.maximum(compute, host).sum() + prologue.sum() + epilogue.sum())


@pytest.mark.parametrize(
    ("host", "message"),
    [
        (np.ones((2, 3)), r"host_compute: expected shape \(2, 2\)"),
        (np.array([[1.0, -1.0], [0.0, 0.0]]), "expected finite times >= 0, got -1.0 at pass 0, layer 1"),
        (np.array([[1.0, 0.0], [math.nan, 0.0]]), "got nan at pass 1, layer 0"),
    ],
)
def test_host_compute_rejects_bad_input(host, message):
    with pytest.raises(ValueError, match=message):
        simulate_timeline(np.ones((2, 2)), np.zeros((2, 2), int), 1.0, host_compute=host)


# ------------------------------------------------------------------------------------------------
# The prefetch plan from simulator events
# ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def hand_prefetch_events(miss: str = "demand"):
    """Simulate the hand trace with the hand score table (cached: callers copy before changing an array)."""
    config = SimConfig("lru", 8, prefetch=PrefetchConfig("learned", top_k=2, budget=2), miss=miss)
    return simulate(hand_trace(), config, score_tables={"learned": hand_score_table()})


def test_prefetch_plan_from_events_by_hand():
    trace = hand_trace()
    result, events = hand_prefetch_events()
    # With 8 slots for 8 items nothing is evicted. The learned table's top-2 picks, step by step:
    #   s0 misses flat 0 and prefetches flat 5 (expert 1) then flat 7 (expert 3), both for s1.
    #   s1 hits flat 5, prefetched by s0, and prefetches flat 2.
    #   s2 hits flat 2, prefetched by s1, and prefetches flat 6, which no step requests (wasted).
    #   s3 hits flat 5 again; the pick for s4, flat 0, is resident, so nothing is prefetched.
    #   s4 hits flat 0; the pick for s5, flat 7, is resident (still pending), so nothing.
    #   s5 hits flat 7: its consumer is s5, later than the step s1 it was prefetched for.
    assert events.prefetched[:, :, 0].reshape(-1).tolist() == [5, 2, 6, -1, -1, -1]
    assert events.prefetched[0, 0].tolist() == [5, 7]
    assert events.prefetch_source[:, :, 0].reshape(-1).tolist() == [-1, 0, 1, -1, -1, 0]
    assert result.prefetches == 4
    assert result.prefetch_hits == 3

    plan = prefetch_plan_from_events(trace, events)
    assert plan == [[1, 5], [2], [NO_CONSUMER], [], [], []]


def test_prefetch_plan_drives_estimate():
    trace = hand_trace()
    _, events = hand_prefetch_events()
    result = estimate_timing(trace, events, SLOW_LINK, HAND_MODEL, record_transfers=True)
    # One demand load (s0's compulsory miss) and four prefetches, each one whole expert.
    assert result.demand_loads == 1
    assert result.prefetches == 4
    assert result.demand_bytes == HAND_MODEL.expert_bytes
    assert result.prefetch_bytes == 4 * HAND_MODEL.expert_bytes
    log = result.timeline.transfers
    assert (log["kind"] == TRANSFER_DEMAND).sum() == 1
    assert sorted(log[log["kind"] == TRANSFER_PREFETCH]["consumer_step"].tolist()) == [NO_CONSUMER, 1, 2, 5]
    # The same plan passed by hand gives the same timeline.
    by_hand = estimate_timing(trace, events.outcomes, SLOW_LINK, HAND_MODEL, prefetches=[[1, 5], [2], [NO_CONSUMER], [], [], []])
    np.testing.assert_array_equal(by_hand.timeline.layer_end, result.timeline.layer_end)
    assert by_hand.late_prefetches == result.late_prefetches


def test_events_and_prefetches_rejected_together():
    _, events = hand_prefetch_events()
    with pytest.raises(ValueError, match="prefetches: expected None when the events record prefetches"):
        estimate_timing(hand_trace(), events, SLOW_LINK, HAND_MODEL, prefetches={0: [1]})


def test_prefetch_events_of_other_shape_rejected():
    _, events = hand_prefetch_events()
    trace = hand_trace()
    with pytest.raises(ValueError, match=r"events.prefetched: expected shape \(3, 2, B\)"):
        prefetch_plan_from_events(trace, events._replace(prefetched=events.prefetched[:2]))
    with pytest.raises(ValueError, match=r"events.prefetch_source: expected shape \(3, 2, 1\)"):
        prefetch_plan_from_events(trace, events._replace(prefetch_source=events.prefetch_source[:, :, :0]))
    with pytest.raises(ValueError, match=r"expected flat ids in \[0, 8\) or -1"):
        prefetch_plan_from_events(trace, events._replace(prefetched=np.full_like(events.prefetched, 8)))
    with pytest.raises(ValueError, match="expected PrefetchEvents"):
        prefetch_plan_from_events(trace, events.outcomes)


def test_inconsistent_prefetch_source_rejected():
    trace = hand_trace()
    _, events = hand_prefetch_events()
    # s3's hit on flat 5 did not come from a pending prefetch of s2 (s2 prefetched flat 6).
    source = events.prefetch_source.copy()
    source[1, 1, 0] = 2
    with pytest.raises(ValueError, match="step 3 hit flat id 5 as prefetched by step 2, but events.prefetched has no such"):
        prefetch_plan_from_events(trace, events._replace(prefetch_source=source))
    # s0's slot is a miss, so it cannot name a prefetch.
    source = events.prefetch_source.copy()
    source[0, 0, 0] = 0
    with pytest.raises(ValueError, match=r"prefetch_source\[0, 0, 0\] = 0: expected -1 unless the slot is a hit"):
        prefetch_plan_from_events(trace, events._replace(prefetch_source=source))
    # A prefetch of s4 cannot serve s1, which ran earlier.
    source = events.prefetch_source.copy()
    source[0, 1, 0] = 4
    with pytest.raises(ValueError, match="expected a step before the requesting step 1"):
        prefetch_plan_from_events(trace, events._replace(prefetch_source=source))


@pytest.mark.parametrize("seed", [0, 1])
def test_plan_consumers_match_prefetch_hits(seed):
    trace = tiny_trace(seed=seed)
    # Random scores: many prefetches are wrong, so some are evicted unused and some used later.
    table = np.random.default_rng(seed).random((trace.num_passes, 2, 2, 8)).astype(np.float32)
    config = SimConfig("lru", 8, prefetch=PrefetchConfig("learned", lookahead=2, top_k=2))
    result, events = simulate(trace, config, score_tables={"learned": table})
    assert result.wasted_prefetches > 0

    plan = prefetch_plan_from_events(trace, events)
    consumers = [consumer for step in plan for consumer in step]
    assert len(consumers) == result.prefetches
    # Every prefetch hit is one consumer. The other prefetches were evicted unused (the simulator's
    # wasted count) or are still resident and unused at the end.
    assert sum(consumer != NO_CONSUMER for consumer in consumers) == result.prefetch_hits
    assert consumers.count(NO_CONSUMER) >= result.wasted_prefetches
    for step, step_consumers in enumerate(plan):
        assert all(consumer == NO_CONSUMER or consumer > step for consumer in step_consumers)
    # Each consumer requests the prefetched expert at a slot whose source is the issuing step.
    experts = build_requests(trace).experts
    for step, step_consumers in enumerate(plan):
        flat_ids = events.prefetched.reshape(-1, events.prefetched.shape[-1])[step]
        for flat, consumer in zip(flat_ids[flat_ids >= 0], step_consumers):
            if consumer == NO_CONSUMER:
                continue
            p, l = divmod(consumer, 2)
            assert flat // 8 == l
            (slot,) = np.flatnonzero(experts[p, l] == flat % 8)
            assert events.prefetch_source[p, l, slot] == step


# ------------------------------------------------------------------------------------------------
# Identities on simulator output
# ------------------------------------------------------------------------------------------------

def test_oracle_with_free_link_equals_all_resident():
    trace = tiny_trace(seed=2)
    result, events = simulate(trace, SimConfig("lru", 8, prefetch=PrefetchConfig("oracle")))
    assert result.prefetches > 0
    timing = estimate_timing(trace, events, FREE_LINK, TINY_MODEL)
    assert timing.prefetches == result.prefetches
    assert timing.timed == timing.all_resident
    assert timing.late_prefetches == 0


def test_oracle_prefetching_hides_transfers():
    trace = tiny_trace(seed=2)
    _, plain_events = simulate(trace, SimConfig("lru", 8))
    _, oracle_events = simulate(trace, SimConfig("lru", 8, prefetch=PrefetchConfig("oracle")))
    plain = estimate_timing(trace, plain_events, SLOW_LINK, TINY_MODEL)
    oracle = estimate_timing(trace, oracle_events, SLOW_LINK, TINY_MODEL)
    # On a slow link an expert transfer takes longer than a layer, so many prefetches arrive late, but
    # the oracle still stalls less than demand loading alone.
    assert oracle.late_prefetches > 0
    assert oracle.late_prefetches <= oracle.prefetches
    assert oracle.demand_loads < plain.demand_loads
    assert oracle.total_stall < plain.total_stall


def test_bytes_are_transfers_times_expert_bytes():
    trace = tiny_trace(seed=4)
    result, events = simulate(trace, SimConfig("lru", 8, prefetch=PrefetchConfig("oracle")))
    timing = estimate_timing(trace, events, SLOW_LINK, TINY_MODEL, record_transfers=True)
    log = timing.timeline.transfers
    assert timing.demand_loads == int(miss_slots(events.outcomes).sum()) == result.misses
    assert timing.demand_loads == (log["kind"] == TRANSFER_DEMAND).sum()
    assert timing.prefetches == (log["kind"] == TRANSFER_PREFETCH).sum()
    assert timing.demand_bytes == timing.demand_loads * TINY_MODEL.expert_bytes
    assert timing.prefetch_bytes == timing.prefetches * TINY_MODEL.expert_bytes
    assert timing.host_computed == 0
    assert timing.host_compute is None


def test_late_prefetch_count_from_log():
    trace = tiny_trace(seed=5)
    _, events = simulate(trace, SimConfig("lru", 8, prefetch=PrefetchConfig("oracle")))
    timing = estimate_timing(trace, events, SLOW_LINK, TINY_MODEL, record_transfers=True)
    untimed = estimate_timing(trace, events, SLOW_LINK, TINY_MODEL)
    # Counted the same whether the log is kept or not; the log is dropped when not requested.
    assert untimed.timeline.transfers is None
    assert untimed.late_prefetches == timing.late_prefetches
    log = timing.timeline.transfers
    used = log[(log["kind"] == TRANSFER_PREFETCH) & (log["consumer_step"] != NO_CONSUMER)]
    ready = timing.timeline.layer_ready.reshape(-1)
    late = sum(end > ready[consumer] for end, consumer in zip(used["end_time"], used["consumer_step"]))
    assert timing.late_prefetches == late


# ------------------------------------------------------------------------------------------------
# Host misses
# ------------------------------------------------------------------------------------------------

def test_host_pairs_by_hand():
    # One prefill pass of 3 tokens over 1 layer of 4 experts, top-2, then one decode token.
    ids = np.array([[[0, 1]], [[0, 2]], [[3, 0]], [[1, 2]]])
    trace = make_trace(
        ids, TraceMetadata("pairs", num_layers=1, num_experts=4, top_k=2, source="test"),
        pass_offsets=np.array([0, 3, 4]), pass_kind=np.array([PASS_PREFILL, PASS_DECODE]),
    )
    requests = build_requests(trace)
    assert requests.experts[:, 0].tolist() == [[0, 1, 2, 3], [1, 2, -1, -1]]
    # Pass 0 misses experts 0 and 3: three tokens select expert 0 and one selects expert 3. Pass 1
    # misses expert 2, which its one token selects.
    missed = np.array([[[True, False, False, True]], [[False, True, False, False]]])
    assert host_expert_pairs(trace, requests, missed).tolist() == [[4], [1]]


def test_host_mode_by_hand():
    # The hand trace with host misses and no prefetcher: nothing is ever inserted, so all 6 requests
    # miss and are computed on the host, one token and one expert at each step.
    trace = hand_trace()
    result, events = simulate(trace, SimConfig("lru", 8, miss="host"))
    assert result.misses == 6
    timing = estimate_timing(trace, events, SLOW_LINK, HAND_MODEL, miss="host", record_transfers=True)
    assert timing.miss == "host"
    assert timing.host_computed == 6
    assert timing.demand_loads == 0
    assert timing.demand_bytes == 0
    assert len(timing.timeline.transfers) == 0

    # Host: reading 24,576 bytes at 1 GB/s (24.6 us) bounds it, not 6 x 64 x 32 FLOPs at 10 GFLOP/s.
    expert_bytes = 3 * 64 * 32 * 2
    np.testing.assert_allclose(timing.host_compute, np.full((3, 2), expert_bytes / 1e9))
    # The device computes attention, the router and no routed expert.
    routed = routed_experts_time(HAND_MODEL, SLOW_LINK, np.ones(1), np.ones(1))[0]
    np.testing.assert_allclose(timing.device_compute, timing.compute - routed)
    excess = np.maximum(0.0, timing.host_compute - timing.device_compute)
    assert timing.total_stall == pytest.approx(excess.sum())
    assert timing.timed.total_time == pytest.approx(timing.all_resident.total_time - 6 * routed + excess.sum())


def test_host_stall_equals_excess_over_device():
    trace = tiny_trace(seed=6)
    result, events = simulate(trace, SimConfig("lru", 8, miss="host"))
    timing = estimate_timing(trace, events, SLOW_LINK, TINY_MODEL, miss="host")
    assert timing.host_computed == result.misses > 0
    excess = np.maximum(0.0, timing.host_compute - timing.device_compute)
    np.testing.assert_allclose(timing.timeline.stall, excess, rtol=1e-9, atol=1e-15)
    assert timing.total_stall == pytest.approx(excess.sum(), rel=1e-9)
    # The device computes fewer experts than with every expert resident, never more.
    assert (timing.device_compute <= timing.compute + 1e-15).all()
    assert timing.all_resident == estimate_timing(trace, events, SLOW_LINK, TINY_MODEL).all_resident


def test_host_mode_with_prefetcher():
    # In host mode the prefetches still travel over the link; only misses go to the host.
    trace = hand_trace()
    result, events = hand_prefetch_events(miss="host")
    timing = estimate_timing(trace, events, FREE_LINK, HAND_MODEL, miss="host", record_transfers=True)
    assert timing.prefetches == result.prefetches > 0
    assert timing.host_computed == result.misses
    assert timing.demand_loads == 0
    assert (timing.timeline.transfers["kind"] == TRANSFER_PREFETCH).all()
    # With a free link the only stall is the host's excess over the device.
    excess = np.maximum(0.0, timing.host_compute - timing.device_compute)
    assert timing.total_stall == pytest.approx(excess.sum())


def test_host_mode_needs_host_figures():
    trace = hand_trace()
    _, events = simulate(trace, SimConfig("lru", 8, miss="host"))
    bare = Hardware("bare", 1e12, 1e11, 1e8, 1e-5)
    with pytest.raises(ValueError, match="hardware 'bare' has no host compute figures"):
        estimate_timing(trace, events, bare, HAND_MODEL, miss="host")


def test_unknown_miss_mode_rejected():
    trace = hand_trace()
    _, events = simulate(trace, SimConfig("lru", 8))
    with pytest.raises(ValueError, match=r"miss: expected one of demand, host, substitute \(the modes the timing model covers\), got 'cpu'"):
        estimate_timing(trace, events, SLOW_LINK, HAND_MODEL, miss="cpu")


# ------------------------------------------------------------------------------------------------
# Substitute misses
# ------------------------------------------------------------------------------------------------


def test_substitute_loads_only_unreplaced_misses():
    trace = tiny_trace(seed=3)
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(trace.num_tokens, 2, 8)).astype(np.float32)
    trace = dataclasses.replace(trace, router_logits=logits)
    config = SimConfig("lru", 8, miss="substitute")
    result, events = simulate(trace, config)
    timing = estimate_timing(trace, events, SLOW_LINK, TINY_MODEL, miss="substitute")
    assert result.substitutions > 0
    assert timing.demand_loads == result.misses - result.substitutions
    assert timing.demand_bytes == timing.demand_loads * TINY_MODEL.expert_bytes


def test_substitute_needs_its_events():
    trace = tiny_trace(seed=3)
    result, events = simulate(trace, SimConfig("lru", 8))
    with pytest.raises(ValueError, match="miss mode 'substitute' needs the PrefetchEvents"):
        estimate_timing(trace, events, SLOW_LINK, TINY_MODEL, miss="substitute")


def test_substitute_events_need_substitute_mode():
    trace = tiny_trace(seed=3)
    rng = np.random.default_rng(3)
    trace = dataclasses.replace(trace, router_logits=rng.normal(size=(trace.num_tokens, 2, 8)).astype(np.float32))
    result, events = simulate(trace, SimConfig("lru", 8, miss="substitute"))
    assert result.substitutions > 0
    with pytest.raises(ValueError, match="miss mode 'substitute', but miss is 'demand'"):
        estimate_timing(trace, events, SLOW_LINK, TINY_MODEL)


def test_invalid_outcome_code_rejected():
    trace = hand_trace()
    _, events = simulate(trace, SimConfig("lru", 8))
    outcomes = np.array(events.outcomes)
    outcomes[1, 0, 0] = 9
    with pytest.raises(ValueError, match=r"outcome 9 at index \(1, 0, 0\) is not an outcome code"):
        estimate_timing(trace, outcomes, SLOW_LINK, HAND_MODEL)

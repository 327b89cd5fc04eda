"""Tests of the timing model: presets, the roofline, the transfer timeline and the identities it must meet."""

from __future__ import annotations

import math

import numpy as np
import pytest

from specmd_jax.sim import SimConfig, build_requests, run_sweep
from specmd_jax.timing import (
    HARDWARE_PRESETS,
    MODEL_PRESETS,
    NO_CONSUMER,
    Hardware,
    ModelShape,
    estimate_timing,
    get_hardware,
    get_model_shape,
    simulate_timeline,
)
from specmd_jax.timing.compute import attention_time, lm_head_time, router_time, routed_experts_time
from specmd_jax.timing.estimate import NOTE_NO_PREFILL, sequence_context
from specmd_jax.timing.timeline import TRANSFER_DEMAND, TRANSFER_PREFETCH
from specmd_jax.traces import PASS_DECODE, PASS_PREFILL, TraceMetadata, make_trace

# A model and trace small enough to check by hand: 2 MoE layers, 8 experts, top-2.
TINY_MODEL = ModelShape(
    name="tiny", num_layers=2, num_experts=8, top_k=2, hidden=64, expert_ffn=32,
    num_heads=4, num_kv_heads=4, head_dim=16, vocab_size=256,
)
SLOW_LINK = Hardware("slow-link", peak_flops=1e12, memory_bandwidth=1e11, link_bandwidth=1e8, transfer_latency=1e-5)


def tiny_trace(prompt_tokens: int = 4, decode_tokens: int = 6, sequences: int = 2, seed: int = 0):
    """Random top-2 routing over 2 layers x 8 experts: each sequence is one prefill pass then decode passes."""
    rng = np.random.default_rng(seed)
    per_sequence = prompt_tokens + decode_tokens
    num_tokens = sequences * per_sequence
    ids = np.stack([
        np.stack([rng.choice(8, size=2, replace=False) for _ in range(2)]) for _ in range(num_tokens)
    ])
    offsets, kinds, sequence_ids = [0], [], []
    for sequence in range(sequences):
        if prompt_tokens:
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


def lru_events(trace, capacity: int):
    _, events = run_sweep(trace, [SimConfig("lru", capacity)], record_events=True)
    return next(iter(events.values()))


# ------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------

def test_olmoe_expert_bytes():
    olmoe = get_model_shape("olmoe-1b-7b")
    # 3 matrices x 2048 x 1024 values x 2 bytes = 12,582,912 bytes, about 12.6 MB.
    assert olmoe.expert_bytes == 12_582_912
    assert round(olmoe.expert_bytes / 1e6, 1) == 12.6
    # 16 layers x 64 experts x 12,582,912 bytes = 12 GiB exactly (12.9e9 bytes).
    assert olmoe.total_expert_bytes == 12 * 2**30


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_model_preset_expert_bytes(name):
    model = MODEL_PRESETS[name]
    assert model.name == name
    assert model.expert_bytes == 3 * model.hidden * model.expert_ffn * model.dtype_bytes
    assert model.total_expert_bytes == model.num_moe_layers * model.num_experts * model.expert_bytes
    assert model.source


def test_model_preset_layer_counts():
    # MoE layer counts must equal the L of the traces of these models.
    assert get_model_shape("deepseek-v2-lite").num_moe_layers == 26
    assert get_model_shape("flame-moe-290m").num_moe_layers == 8
    assert get_model_shape("mixtral-8x7b").num_moe_layers == 32
    assert get_model_shape("qwen3-30b-a3b").num_moe_layers == 48


@pytest.mark.parametrize("name", sorted(HARDWARE_PRESETS))
def test_hardware_preset_valid(name):
    hardware = HARDWARE_PRESETS[name]
    assert hardware.name == name
    assert hardware.source
    assert 1e9 <= hardware.link_bandwidth <= hardware.memory_bandwidth
    assert 0 < hardware.transfer_latency < 1e-3


def test_hardware_preset_count():
    assert len(HARDWARE_PRESETS) == 6
    assert get_hardware("constrained-5gbs").link_bandwidth == 5e9


def test_unknown_presets_rejected():
    with pytest.raises(ValueError, match="unknown hardware preset 'x'"):
        get_hardware("x")
    with pytest.raises(ValueError, match="unknown model preset 'x'"):
        get_model_shape("x")


def test_invalid_hardware_rejected():
    with pytest.raises(ValueError, match="link_bandwidth"):
        Hardware("bad", 1e12, 1e11, link_bandwidth=0, transfer_latency=0)
    with pytest.raises(ValueError, match="transfer_latency"):
        Hardware("bad", 1e12, 1e11, link_bandwidth=1e9, transfer_latency=-1)
    assert Hardware("free", 1e12, 1e11, link_bandwidth=math.inf, transfer_latency=0).transfer_time(1e9) == 0


def test_invalid_model_shape_rejected():
    with pytest.raises(ValueError, match="top_k"):
        ModelShape("bad", 2, 4, 8, 64, 32, 4, 4, 16, 256)
    with pytest.raises(ValueError, match="dense_ffn"):
        ModelShape("bad", 2, 8, 2, 64, 32, 4, 4, 16, 256, num_dense_layers=1)


# ------------------------------------------------------------------------------------------------
# Roofline compute
# ------------------------------------------------------------------------------------------------

def test_decode_experts_memory_bound():
    olmoe, a100 = get_model_shape("olmoe-1b-7b"), get_hardware("pcie4-a100")
    # One decode token with 8 active experts reads 8 x 12,582,912 bytes at 2,039 GB/s = 49.4 us;
    # its 8 x 6 x 2048 x 1024 FLOPs take 0.3 us at 312 TFLOPS, so memory bounds it.
    seconds = routed_experts_time(olmoe, a100, np.array([1.0]), np.array([8.0]))
    assert seconds[0] == pytest.approx(8 * 12_582_912 / 2039e9)


def test_prefill_experts_compute_bound():
    olmoe, a100 = get_model_shape("olmoe-1b-7b"), get_hardware("pcie4-a100")
    # 4096 tokens x 8 experts x 6 x 2048 x 1024 FLOPs = 4.1e11 FLOPs at 312 TFLOPS = 1.32 ms; reading
    # all 64 experts (0.81 GB) at 2,039 GB/s takes 0.39 ms, so compute bounds it.
    seconds = routed_experts_time(olmoe, a100, np.array([4096.0]), np.array([64.0]))
    assert seconds[0] == pytest.approx(4096 * 8 * 6 * 2048 * 1024 / 312e12)


def test_router_and_attention_by_hand():
    olmoe, a100 = get_model_shape("olmoe-1b-7b"), get_hardware("pcie4-a100")
    # Router of a decode token: 2048 x 64 bf16 weights = 262,144 bytes at 2,039 GB/s.
    assert router_time(olmoe, a100, np.array([1.0]))[0] == pytest.approx(262_144 / 2039e9)
    # Decode attention after 999 tokens: 4 x 2048 x 2048 weights plus 1000 positions x 2 x 16 x 128
    # KV values, all bf16: (16,777,216 + 4,096,000) x 2 bytes at 2,039 GB/s.
    seconds = attention_time(olmoe, a100, np.array([1.0]), np.array([999.0]))[0]
    assert seconds == pytest.approx((16_777_216 + 4_096_000) * 2 / 2039e9)


def test_attention_grows_with_context():
    olmoe, a100 = get_model_shape("olmoe-1b-7b"), get_hardware("pcie4-a100")
    seconds = attention_time(olmoe, a100, np.ones(3), np.array([0.0, 1000.0, 10000.0]))
    assert seconds[0] < seconds[1] < seconds[2]


def test_sequence_context_restarts():
    # Sequence 0: prefill of 4 then 2 decode tokens; sequence 1: prefill of 3 then 1 decode token.
    offsets = np.array([0, 4, 5, 6, 9, 10])
    context = sequence_context(offsets, np.array([0, 0, 0, 1, 1]))
    assert context.tolist() == [0, 4, 5, 0, 3]


# ------------------------------------------------------------------------------------------------
# Timeline: hand-computed cases (times in ms, written as plain numbers)
# ------------------------------------------------------------------------------------------------

def test_timeline_three_passes_by_hand():
    compute = np.ones((3, 2))  # 1 ms per layer
    demand = np.array([[2, 1], [0, 1], [1, 0]])  # misses per (pass, layer)
    timeline = simulate_timeline(compute, demand, transfer_time=2.0)  # 2 ms per transfer

    # Pass 0. Layer 0 is reached at 0, loads 2 experts over [0, 4], starts at 4 (stall 4), ends at 5.
    #         Layer 1 is reached at 5, loads 1 expert over [5, 7], starts at 7 (stall 2), ends at 8.
    # Pass 1. Layer 0 has no miss: 8 to 9. Layer 1 loads over [9, 11], runs 11 to 12 (stall 2).
    # Pass 2. Layer 0 loads over [12, 14], runs 14 to 15 (stall 2). Layer 1 has no miss: 15 to 16.
    assert timeline.layer_ready.tolist() == [[0, 5], [8, 9], [12, 15]]
    assert timeline.layer_start.tolist() == [[4, 7], [8, 11], [14, 15]]
    assert timeline.layer_end.tolist() == [[5, 8], [9, 12], [15, 16]]
    assert timeline.stall.tolist() == [[4, 2], [0, 2], [2, 0]]
    assert timeline.pass_start.tolist() == [0, 8, 12]
    assert timeline.pass_time.tolist() == [8, 4, 4]
    # Total: 6 ms of compute + 5 transfers x 2 ms of stall.
    assert timeline.total_time == 16
    assert timeline.total_stall == 10


def test_timeline_prologue_and_epilogue():
    # One pass, one layer: prologue 3, one 2 ms load issued at 3 (after the prologue), compute 1,
    # epilogue 0.5: the pass ends at 3 + 2 + 1 + 0.5 = 6.5.
    timeline = simulate_timeline(np.ones((1, 1)), np.ones((1, 1), int), 2.0, prologue=[3.0], epilogue=[0.5])
    assert timeline.layer_ready.tolist() == [[3.0]]
    assert timeline.layer_start.tolist() == [[5.0]]
    assert timeline.pass_time.tolist() == [6.5]


def test_prefetch_hides_next_layer_load():
    compute = np.full((1, 2), 3.0)  # 3 ms per layer
    # Without a prefetch: layer 1 is reached at 3 and loads its expert over [3, 5]: stall 2.
    plain = simulate_timeline(compute, np.array([[0, 1]]), transfer_time=2.0)
    assert plain.stall.tolist() == [[0, 2]]
    assert plain.total_time == 8

    # A prefetch issued at the start of step 0 for step 1 runs over [0, 2], inside layer 0's
    # compute [0, 3], so layer 1 starts at 3 with no stall and the pass takes 6 ms.
    timeline = simulate_timeline(compute, np.zeros((1, 2), int), 2.0, prefetches={0: [1]}, record_transfers=True)
    assert timeline.stall.tolist() == [[0, 0]]
    assert timeline.total_time == 6
    log = timeline.transfers
    assert log["kind"].tolist() == [TRANSFER_PREFETCH]
    assert log["start_time"].tolist() == [0.0]
    assert log["end_time"].tolist() == [2.0]


def test_prefetch_queued_behind_demand():
    compute = np.full((1, 2), 3.0)
    # Step 0 misses one expert and prefetches one for step 1. The demand load goes first, over [0, 2];
    # layer 0 runs 2 to 5. The prefetch runs over [2, 4] and arrives before layer 1 is reached at 5.
    timeline = simulate_timeline(compute, np.array([[1, 0]]), 2.0, prefetches=[[1], []], record_transfers=True)
    assert timeline.layer_start.tolist() == [[2, 5]]
    assert timeline.stall.tolist() == [[2, 0]]
    log = timeline.transfers
    assert log["kind"].tolist() == [TRANSFER_DEMAND, TRANSFER_PREFETCH]
    assert log["start_time"].tolist() == [0, 2]


def test_demand_overtakes_queued_prefetches():
    compute = np.ones((1, 3))
    # Step 0 issues two unused prefetches at 0. The first occupies the link over [0, 2]; the second
    # waits in the queue. Layer 1 is reached at 1 and misses one expert: it waits for the transfer in
    # flight, then goes ahead of the queued prefetch, over [2, 4], and layer 1 runs 4 to 5 (stall 3).
    # The second prefetch starts when the link frees at 4 and runs over [4, 6], during layer 1.
    # Layer 2 has no miss and runs 5 to 6.
    timeline = simulate_timeline(
        compute, np.array([[0, 1, 0]]), 2.0, prefetches={0: [NO_CONSUMER, NO_CONSUMER]}, record_transfers=True
    )
    assert timeline.layer_start.tolist() == [[0, 4, 5]]
    assert timeline.stall.tolist() == [[0, 3, 0]]
    assert timeline.total_time == 6
    log = timeline.transfers
    assert log["kind"].tolist() == [TRANSFER_PREFETCH, TRANSFER_DEMAND, TRANSFER_PREFETCH]
    assert log["start_time"].tolist() == [0, 2, 4]
    assert log["end_time"].tolist() == [2, 4, 6]


def test_in_flight_prefetch_delays_its_consumer():
    compute = np.ones((1, 2))
    # A prefetch for step 1 issued at 0 runs over [0, 4] (4 ms transfer). Layer 1 is reached at 1 and
    # waits for it: it starts at 4, a stall of 3 rather than a full 4 ms demand load.
    timeline = simulate_timeline(compute, np.zeros((1, 2), int), 4.0, prefetches={0: [1]})
    assert timeline.layer_start.tolist() == [[0, 4]]
    assert timeline.stall.tolist() == [[0, 3]]


def test_queued_prefetch_promoted_to_demand():
    compute = np.ones((1, 3))
    # Step 0 issues an unused prefetch and then one for step 1, both at 0. The first runs over [0, 2];
    # the second is still queued when layer 1 is reached at 1, so it is promoted: it runs over [2, 4]
    # with demand priority and layer 1 starts at 4.
    timeline = simulate_timeline(
        compute, np.zeros((1, 3), int), 2.0, prefetches={0: [NO_CONSUMER, 1]}, record_transfers=True
    )
    assert timeline.layer_start.tolist() == [[0, 4, 5]]
    log = timeline.transfers
    assert log["consumer_step"].tolist() == [NO_CONSUMER, 1]
    assert log["start_time"].tolist() == [0, 2]


def test_prefetch_plan_rejects_bad_consumers():
    compute = np.ones((1, 2))
    demand = np.zeros((1, 2), int)
    with pytest.raises(ValueError, match="consumer steps"):
        simulate_timeline(compute, demand, 1.0, prefetches={1: [1]})
    with pytest.raises(ValueError, match="consumer steps"):
        simulate_timeline(compute, demand, 1.0, prefetches={0: [2]})
    with pytest.raises(ValueError, match="2 entries"):
        simulate_timeline(compute, demand, 1.0, prefetches=[[1]])


def test_timeline_rejects_bad_shapes():
    with pytest.raises(ValueError, match="demand_loads"):
        simulate_timeline(np.ones((2, 2)), np.ones((2, 3), int), 1.0)
    with pytest.raises(ValueError, match="transfer_time"):
        simulate_timeline(np.ones((2, 2)), np.ones((2, 2), int), -1.0)
    with pytest.raises(ValueError, match="prologue"):
        simulate_timeline(np.ones((2, 2)), np.ones((2, 2), int), 1.0, prologue=[1.0])


# ------------------------------------------------------------------------------------------------
# Identities on simulator output
# ------------------------------------------------------------------------------------------------

def test_free_transfers_equal_all_resident():
    trace = tiny_trace()
    events = lru_events(trace, capacity=8)
    free = Hardware("free-link", 1e12, 1e11, link_bandwidth=math.inf, transfer_latency=0.0)
    result = estimate_timing(trace, events, free, TINY_MODEL)
    assert result.demand_loads > 0
    assert result.timed == result.all_resident
    assert result.timed.total_stall == 0
    assert result.no_cache == result.all_resident


def test_warm_full_cache_equals_all_resident():
    # Tokens 0..3 of the prefill pass select experts (0, 1), (2, 3), (4, 5), (6, 7) at both layers,
    # so the first pass requests all 2 x 8 experts and a cache of 16 slots has no miss after it.
    trace = tiny_trace(prompt_tokens=4, decode_tokens=8, sequences=1, seed=1)
    ids = trace.expert_ids.copy()
    ids[:4] = np.arange(8).reshape(4, 1, 2)
    trace = make_trace(ids, trace.metadata, pass_offsets=trace.pass_offsets, pass_kind=trace.pass_kind,
                       pass_sequence=trace.pass_sequence)
    assert build_requests(trace).counts[0].tolist() == [8, 8]

    result = estimate_timing(trace, lru_events(trace, capacity=16), SLOW_LINK, TINY_MODEL)
    resident = simulate_timeline(
        result.compute, np.zeros(result.compute.shape, int), 0.0,
        epilogue=lm_head_time(TINY_MODEL, SLOW_LINK, trace.num_passes),
    )
    # The warm-up pass loads all 16 experts; every later pass takes its all-resident time. Pass times
    # are differences of absolute clocks that differ by the warm-up stall, so they agree to rounding.
    assert result.demand_loads == 16
    assert result.timeline.stall[0].sum() == pytest.approx(16 * result.transfer_time)
    assert result.timeline.stall[1:].sum() == 0
    np.testing.assert_allclose(result.timeline.pass_time[1:], resident.pass_time[1:], rtol=1e-9)
    assert result.tpot == pytest.approx(result.all_resident.tpot, rel=1e-9)
    assert resident.total_time == result.all_resident.total_time


def test_no_cache_closed_form():
    trace = tiny_trace(seed=2)
    result = estimate_timing(trace, lru_events(trace, capacity=8), SLOW_LINK, TINY_MODEL)
    counts = build_requests(trace).counts
    # With no prefetch the link is idle whenever a layer is reached, so every step waits for all of
    # its requests one after another: no-cache = all-resident + (all requests) x transfer time.
    expected = result.all_resident.total_time + counts.sum() * result.transfer_time
    assert result.no_cache.total_time == pytest.approx(expected, rel=1e-12)
    assert result.no_cache.total_stall == pytest.approx(counts.sum() * result.transfer_time, rel=1e-12)
    # The simulated cache lies between the two references.
    assert result.all_resident.total_time < result.timed.total_time < result.no_cache.total_time


def test_timed_stall_equals_misses_times_transfer():
    trace = tiny_trace(seed=3)
    events = lru_events(trace, capacity=10)
    result = estimate_timing(trace, events, SLOW_LINK, TINY_MODEL)
    misses = int(np.isin(events.outcomes, (2, 3, 4)).sum())
    assert result.demand_loads == misses
    assert result.total_stall == pytest.approx(misses * result.transfer_time, rel=1e-12)
    assert result.timed.total_time == pytest.approx(result.all_resident.total_time + result.total_stall, rel=1e-12)


def test_ttft_and_tpot_definitions():
    trace = tiny_trace(prompt_tokens=4, decode_tokens=6, sequences=2, seed=4)
    result = estimate_timing(trace, lru_events(trace, capacity=8), SLOW_LINK, TINY_MODEL)
    pass_time = result.timeline.pass_time
    # Sequence 0 is passes 0 (prefill) .. 6; sequence 1 is passes 7 (prefill) .. 13.
    assert result.ttft_per_sequence == pytest.approx({0: pass_time[0] + pass_time[1], 1: pass_time[7] + pass_time[8]})
    assert result.ttft == pytest.approx((pass_time[0] + pass_time[1] + pass_time[7] + pass_time[8]) / 2)
    decode = np.r_[1:7, 8:14]
    assert result.tpot == pytest.approx(pass_time[decode].mean())
    assert result.note == ""


def test_decode_only_trace_reports_tpot_only():
    trace = tiny_trace(prompt_tokens=0, decode_tokens=10, sequences=1, seed=5)
    result = estimate_timing(trace, lru_events(trace, capacity=8), SLOW_LINK, TINY_MODEL)
    assert result.ttft is None
    assert result.all_resident.ttft is None
    assert result.tpot == pytest.approx(result.timeline.pass_time.mean())
    assert result.note == NOTE_NO_PREFILL


def test_prefetch_plan_through_estimate():
    trace = tiny_trace(seed=6)
    events = lru_events(trace, capacity=8)
    plain = estimate_timing(trace, events, SLOW_LINK, TINY_MODEL)
    wasted = estimate_timing(trace, events, SLOW_LINK, TINY_MODEL, prefetches={0: [NO_CONSUMER] * 3})
    assert wasted.prefetches == 3
    # Wasted prefetches only occupy the link, so they can only delay the demand loads.
    assert wasted.timed.total_time >= plain.timed.total_time
    assert wasted.all_resident == plain.all_resident


def test_mismatched_model_rejected():
    trace = tiny_trace()
    events = lru_events(trace, capacity=8)
    with pytest.raises(ValueError, match="2 MoE layers but model shape 'olmoe-1b-7b' has 16"):
        estimate_timing(trace, events, SLOW_LINK, get_model_shape("olmoe-1b-7b"))


def test_events_of_other_trace_rejected():
    trace = tiny_trace(seed=7)
    other = tiny_trace(seed=8)
    events = lru_events(other, capacity=8)
    with pytest.raises(ValueError, match="recorded on another trace"):
        estimate_timing(trace, events, SLOW_LINK, TINY_MODEL)
    with pytest.raises(ValueError, match="expected outcomes of shape"):
        estimate_timing(trace, events.outcomes[:, :1], SLOW_LINK, TINY_MODEL)


def test_olmoe_synthetic_end_to_end():
    from specmd_jax.traces.synthetic import load_synthetic

    trace = load_synthetic("synthetic:olmoe-1b-7b?sequences=1&prompt=32&decode=16&seed=0")
    events = lru_events(trace, capacity=256)
    result = estimate_timing(trace, events, get_hardware("pcie4-a100"), get_model_shape("olmoe-1b-7b"))
    # One OLMoE expert over the PCIe 4.0 preset: 10 us + 12,582,912 B / 25.2 GB/s = 0.509 ms.
    assert result.transfer_time == pytest.approx(1e-5 + 12_582_912 / (0.8 * 31.5076923e9), rel=1e-6)
    assert result.all_resident.total_time < result.timed.total_time < result.no_cache.total_time
    assert result.ttft is not None
    assert result.tpot is not None


def test_prefill_only_trace_notes_missing_tpot():
    from specmd_jax.sim import SimConfig, run_sweep
    from specmd_jax.timing import estimate_timing, get_hardware, get_model_shape
    from specmd_jax.traces import PASS_PREFILL, TraceMetadata, make_trace

    # One prefill pass of 2 tokens in FLAME-MoE's shape (8 MoE layers, 64 experts, top-6).
    ids = np.stack([np.tile(np.arange(6), (8, 1)), np.tile(np.arange(6, 12), (8, 1))])
    trace = make_trace(
        ids, TraceMetadata("flame-shaped", 8, 64, 6, "test"),
        pass_offsets=np.array([0, 2]), pass_kind=np.array([PASS_PREFILL]),
    )
    _, events = run_sweep(trace, [SimConfig("lru", 512)], scope="global", record_events=True)
    result = estimate_timing(trace, events[SimConfig("lru", 512)], get_hardware("pcie4-a100"), get_model_shape("flame-moe-290m"))
    assert result.ttft is None
    assert result.tpot is None
    assert "no decode pass" in result.note
    assert result.timed.total_time > result.all_resident.total_time

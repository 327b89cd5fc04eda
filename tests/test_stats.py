"""Tests of `specmd_jax.traces.stats` on hand-worked traces and on the real FLAME-MoE sample."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from specmd_jax.sim.requests import request_presence
from specmd_jax.traces import MISSING_EXPERT, PASS_DECODE, PASS_PREFILL, TraceMetadata, make_trace
from specmd_jax.traces import stats as stats_module
from specmd_jax.traces.stats import compute_stats, format_stats, stats_to_dict
from specmd_jax.traces.synthetic import load_synthetic


def metadata(num_layers: int, num_experts: int, top_k: int, synthetic: bool = False) -> TraceMetadata:
    return TraceMetadata(
        model="hand-made", num_layers=num_layers, num_experts=num_experts, top_k=top_k, source="test", synthetic=synthetic
    )


def three_pass_trace(missing_cell: tuple[int, int] | None = None):
    """Three decode passes of one sequence, 2 layers, 4 experts, top-2."""
    expert_ids = np.array(
        [
            [[0, 1], [2, 3]],  # token 0: layer 0, layer 1
            [[1, 2], [2, 0]],  # token 1
            [[0, 1], [2, 0]],  # token 2
        ]
    )
    missing = np.zeros((3, 2), dtype=bool)
    if missing_cell is not None:
        missing[missing_cell] = True
        expert_ids[missing_cell] = MISSING_EXPERT
    return make_trace(expert_ids, metadata(2, 4, 2), missing=missing)


# Layer 0 loads: expert 0 in passes 0 and 2 -> 2, expert 1 -> 3, expert 2 -> 1, expert 3 -> 0.
# Layer 1 loads: expert 0 -> 2, expert 2 -> 3, expert 3 -> 1, expert 1 -> 0. Both layers: total 6,
# mean 1.5, max 3, so max/mean = 2.0; shares 1/3, 1/2, 1/6 give entropy
# -(1/3 log2 1/3 + 1/2 log2 1/2 + 1/6 log2 1/6) = 0.52832 + 0.5 + 0.43083 = 1.45915 bits.
HAND_ENTROPY = -(1 / 3 * math.log2(1 / 3) + 1 / 2 * math.log2(1 / 2) + 1 / 6 * math.log2(1 / 6))


def test_hand_trace_counts():
    stats = compute_stats(three_pass_trace())
    assert stats.num_passes == 3
    assert stats.num_prefill_passes == 0
    assert stats.num_decode_passes == 3
    assert stats.num_tokens == 3
    assert stats.num_sequences == 1
    assert (stats.num_layers, stats.num_experts, stats.top_k) == (2, 4, 2)
    assert stats.num_missing_cells == 0


def test_hand_trace_popularity_skew():
    stats = compute_stats(three_pass_trace())
    assert stats.load_max_mean == pytest.approx((2.0, 2.0))
    assert HAND_ENTROPY == pytest.approx(1.45915, abs=1e-5)
    assert stats.load_entropy_bits == pytest.approx((HAND_ENTROPY, HAND_ENTROPY))
    assert stats.max_entropy_bits == pytest.approx(2.0)


def test_hand_trace_overlap():
    stats = compute_stats(three_pass_trace())
    # Layer 0: pass 1 {1,2} vs pass 0 {0,1} shares {1} -> 1/2; pass 2 {0,1} vs pass 1 {1,2} -> 1/2.
    # Layer 1: pass 1 {0,2} vs pass 0 {2,3} -> 1/2; pass 2 {0,2} vs pass 1 {0,2} -> 2/2. Mean 0.75.
    assert stats.overlap == pytest.approx((0.5, 0.75))
    assert stats.overlap_pairs == (2, 2)
    assert stats.overlap_uniform == pytest.approx(0.5)
    # Chance, layer 0: request probabilities per pass 2/3, 1, 1/3, 0 ->
    # sum(pi^2) / sum(pi) = (4/9 + 1 + 1/9) / 2 = 7/9. Layer 1 has the same probabilities.
    assert stats.overlap_chance == pytest.approx((7 / 9, 7 / 9))


def test_hand_trace_reuse_distance():
    stats = compute_stats(three_pass_trace())
    # One pass is L = 2 steps. Layer 0: expert 0 at passes 0 and 2 (4 steps), expert 1 at passes 0, 1, 2
    # (2 and 2 steps), expert 2 at pass 1 only. Layer 1: expert 0 at passes 1 and 2 (2 steps), expert 2
    # at passes 0, 1, 2 (2 and 2 steps), expert 3 at pass 0 only. So 12 requests give 6 distances, and
    # the 6 last requests of their items are never reused.
    assert stats.num_requests == 12
    assert stats.never_reused_fraction == pytest.approx(0.5)
    assert stats.reuse_distance_histogram == ((2, 2, 5), (4, 6, 1))
    distances = np.array([4, 2, 2, 2, 2, 2])
    for quantile, value in stats.reuse_distance_quantiles.items():
        assert value == np.quantile(distances, quantile, method="inverted_cdf"), quantile


def test_hand_trace_missing_cell_skipped():
    stats = compute_stats(three_pass_trace(missing_cell=(1, 0)))
    assert stats.num_missing_cells == 1
    # Layer 0 keeps passes 0 and 2, both {0, 1}: loads 2, 2, 0, 0 -> max/mean 2 / 1 = 2, entropy 1 bit.
    assert stats.load_max_mean[0] == pytest.approx(2.0)
    assert stats.load_entropy_bits[0] == pytest.approx(1.0)
    # Both layer-0 pairs touch the empty pass 1, so there is no overlap value.
    assert stats.overlap_pairs[0] == 0
    assert math.isnan(stats.overlap[0])
    # Layer 0 now has experts 0 and 1 at passes 0 and 2 only: two distances of 4 steps. Layer 1 is
    # unchanged: three distances of 2 steps.
    assert stats.reuse_distance_histogram[0] == (2, 2, 3)
    assert stats.reuse_distance_histogram[1] == (4, 6, 2)
    # Next layer: token 1 is skipped, token 0 trains (index < 3 // 2 = 1), token 2 tests:
    # top-1 0 -> 2 learned from token 0; token 2 has 0 -> 2. Accuracy 1, majority (2) also 1.
    assert stats.next_layer_accuracy == (1.0,)
    assert stats.next_layer_test_tokens == (1,)


def test_prefill_uses_request_sets():
    # One layer, 4 experts, top-2. Sequence 0: prefill of 2 tokens, then 1 decode; sequence 1: 2 decodes.
    expert_ids = np.array([[[0, 1]], [[1, 2]], [[2, 3]], [[0, 1]], [[1, 0]]])
    trace = make_trace(
        expert_ids,
        metadata(1, 4, 2),
        pass_offsets=np.array([0, 2, 3, 4, 5]),
        pass_kind=np.array([PASS_PREFILL, PASS_DECODE, PASS_DECODE, PASS_DECODE]),
        pass_sequence=np.array([0, 0, 1, 1]),
    )
    stats = compute_stats(trace)
    assert (stats.num_passes, stats.num_prefill_passes, stats.num_decode_passes) == (4, 1, 3)
    assert (stats.num_tokens, stats.num_sequences) == (5, 2)
    # Pass 1 {2,3} vs prefill {0,1,2}: 1/2. Pass 2 starts sequence 1: no pair. Pass 3 {0,1} vs pass 2
    # {0,1}: 1. Mean 0.75 over 2 pairs.
    assert stats.overlap == pytest.approx((0.75,))
    assert stats.overlap_pairs == (2,)
    # Request counts: expert 0 in passes 0, 2, 3 -> 3; expert 1 -> 3 (the prefill counts once, though
    # two of its tokens chose it); expert 2 -> 2; expert 3 -> 1. Mean 9/4, max/mean = 3 / 2.25.
    assert stats.load_max_mean == pytest.approx((3 / 2.25,))
    assert stats.next_layer_accuracy == ()


def test_next_layer_lookup_hand_case():
    # Top-1 only. Layer-0 top-1 of tokens 0..7 and layer-1 top-1; tokens 0-3 train, 4-7 test.
    layer0 = [0, 0, 1, 2, 0, 1, 2, 3]
    layer1 = [1, 1, 2, 3, 1, 3, 3, 1]
    expert_ids = np.array([[[a], [b]] for a, b in zip(layer0, layer1)])
    stats = compute_stats(make_trace(expert_ids, metadata(2, 4, 1)))
    # Table: 0 -> 1, 1 -> 2, 2 -> 3; expert 3 is unseen and predicts the training majority, 1.
    # Test: 0 -> 1 right, 1 -> 2 wrong (3), 2 -> 3 right, 3 -> 1 right: 3/4.
    # Majority 1 is right for tokens 4 and 7: 2/4.
    assert stats.next_layer_accuracy == (0.75,)
    assert stats.next_layer_majority == (0.5,)
    assert stats.next_layer_test_tokens == (4,)


def test_next_layer_ties_first_seen():
    # Layer-0 top-1 is always expert 0. Tokens 0-3 train with layer-1 top-1 3, 1, 1, 3: a 2-2 tie that
    # the first-seen expert 3 wins, for the table and the majority alike. Tokens 4-7 test, all 3, so
    # the accuracy is 1 (ties broken to the lower id would predict 1 and score 0).
    expert_ids = np.array([[[0], [b]] for b in [3, 1, 1, 3, 3, 3, 3, 3]])
    stats = compute_stats(make_trace(expert_ids, metadata(2, 4, 1)))
    assert stats.next_layer_accuracy == (1.0,)
    assert stats.next_layer_majority == (1.0,)


def test_presence_matches_simulator_requests():
    trace = load_synthetic("synthetic:mixtral-8x7b?sequences=2&prompt=5&decode=20&seed=1")
    expected = request_presence(trace)
    token_pass = stats_module._token_pass(trace)
    for layer in range(trace.num_layers):
        np.testing.assert_array_equal(stats_module._layer_presence(trace, token_pass, layer), expected[:, layer, :])


def test_report_marks_synthetic():
    trace = load_synthetic("synthetic:flame-moe-290m?passes=200&seed=2")
    text = format_stats(compute_stats(trace))
    assert text.splitlines()[0] == "Trace: synthetic:flame-moe-290m"
    assert "SYNTHETIC" in text.splitlines()[1]
    assert "synthetic generator, seed 2" in text


def test_report_real_trace_has_no_synthetic_line():
    text = format_stats(compute_stats(three_pass_trace()))
    assert text.splitlines()[0] == "Trace: hand-made"
    assert "synthetic" not in text.lower()


def test_report_lists_every_layer():
    text = format_stats(compute_stats(three_pass_trace(missing_cell=(1, 0))))
    lines = text.splitlines()
    header = lines.index("Per layer:")
    layer_rows = [line.split() for line in lines[header + 2 : header + 4]]
    assert [row[0] for row in layer_rows] == ["0", "1"]
    assert layer_rows[0][3] == "n/a"  # no overlap pair in layer 0
    assert layer_rows[1][-1] == "-"  # the last layer has no next layer
    assert "Reuse distance" in text


def test_stats_to_dict_is_json():
    stats = compute_stats(three_pass_trace(missing_cell=(1, 0)))
    data = stats_to_dict(stats)
    text = json.dumps(data, allow_nan=False)
    loaded = json.loads(text)
    assert loaded["overlap"][0] is None
    assert loaded["load_max_mean"] == [2.0, 2.0]
    assert loaded["reuse_distance_quantiles"]["0.5"] == stats.reuse_distance_quantiles[0.5]


# Real data: FLAME-MoE-290M, 2,048 teacher-forced tokens, layers 2-9 of the model (8 MoE layers).


def flame_trace(path):
    archive = np.load(path)
    expert_ids = np.transpose(archive["expert_ids"], (1, 0, 2))
    scores = np.transpose(archive["probs"], (1, 0, 2))
    meta = TraceMetadata(
        model="flame-moe-290m",
        num_layers=8,
        num_experts=64,
        top_k=6,
        source="CMU-FLAME/FLAME-MoE-Traces sample",
        layer_ids=tuple(int(x) for x in archive["layers"]),
    )
    return make_trace(expert_ids, meta, scores=scores)


def test_flame_popularity_skew(flame_npz):
    stats = compute_stats(flame_trace(flame_npz))
    # Reference figures for this sample: max/mean per layer 1.4-1.9 (1.375-1.865 unrounded).
    assert round(min(stats.load_max_mean), 1) == 1.4
    assert round(max(stats.load_max_mean), 1) == 1.9
    assert all(1.35 <= value <= 1.9 for value in stats.load_max_mean)
    assert all(value < stats.max_entropy_bits for value in stats.load_entropy_bits)


def test_flame_consecutive_overlap(flame_npz):
    stats = compute_stats(flame_trace(flame_npz))
    # Reference figures: 0.10-0.11 against the uniform 6/64 = 0.094.
    assert all(0.0995 <= value < 0.1115 for value in stats.overlap)
    assert stats.overlap_uniform == pytest.approx(0.09375)
    assert all(value > stats.overlap_uniform for value in stats.overlap)


def test_flame_next_layer_predictability(flame_npz):
    stats = compute_stats(flame_trace(flame_npz))
    # Reference figures: 6.6-20.8 % against 1.9-4.7 % for the majority expert, lookup trained on tokens
    # 0-1023. They come out only with ties broken to the first-seen expert: ties to the lowest id give
    # 7.1-19.4 %.
    assert min(stats.next_layer_accuracy) == pytest.approx(0.066, abs=0.0015)
    assert max(stats.next_layer_accuracy) == pytest.approx(0.208, abs=0.0015)
    assert min(stats.next_layer_majority) == pytest.approx(0.019, abs=0.0015)
    assert max(stats.next_layer_majority) == pytest.approx(0.047, abs=0.0015)
    assert stats.next_layer_test_tokens == (1024,) * 7
    for accuracy, majority in zip(stats.next_layer_accuracy, stats.next_layer_majority):
        assert accuracy > majority


def test_flame_reuse_distance(flame_npz):
    stats = compute_stats(flame_trace(flame_npz))
    assert stats.num_requests == 2048 * 8 * 6
    # One sequence of one-token passes: the smallest distance is one pass = 8 steps.
    assert stats.reuse_distance_histogram[0][0] == 8
    assert stats.reuse_distance_quantiles[0.1] == 8
    # Every (layer, expert) is used, so exactly 8 x 64 requests are the last of their item.
    assert stats.never_reused_fraction == pytest.approx(8 * 64 / stats.num_requests)


def test_flame_loader_gives_same_stats(flame_npz):
    flame = pytest.importorskip("specmd_jax.traces.flame")
    by_loader = stats_to_dict(compute_stats(flame.load_flame_npz(flame_npz)))
    by_hand = stats_to_dict(compute_stats(flame_trace(flame_npz)))
    for key in ("name", "source"):
        del by_loader[key], by_hand[key]
    assert by_loader == by_hand

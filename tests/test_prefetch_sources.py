"""Tests of the free prefetch score tables: hand-worked small cases, the FLAME trace and bad input."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from specmd_jax.prefetch.sources import (
    check_table_size,
    cooccurrence_scores,
    cooccurrence_transitions,
    current_layer_scores,
    frequency_scores,
    gate_speculative_scores,
    oracle_scores,
    previous_pass_scores,
    train_pass_count,
)
from specmd_jax.sim.requests import request_presence
from specmd_jax.traces.io import load_any
from specmd_jax.traces.trace import MISSING_EXPERT, PASS_DECODE, PASS_PREFILL, TraceMetadata, make_trace

# Requests of the 4 passes x 2 layers x 3 experts used below, by global step s = p * 2 + l:
#   s:   0    1    2       3    4    5       6    7
#   set: {0}  {1}  {0, 2}  {1}  {2}  {0, 1}  {1}  {2}
STEP_REQUESTS = [{0}, {1}, {0, 2}, {1}, {2}, {0, 1}, {1}, {2}]


def small_presence() -> np.ndarray:
    presence = np.zeros((8, 3), dtype=bool)
    for step, experts in enumerate(STEP_REQUESTS):
        presence[step, sorted(experts)] = True
    return presence.reshape(4, 2, 3)


def one_hot(*experts: int) -> list[float]:
    row = [0.0, 0.0, 0.0]
    for expert in experts:
        row[expert] = 1.0
    return row


def test_oracle_wraps_into_next_pass() -> None:
    table = oracle_scores(small_presence(), lookahead=2)
    assert table.shape == (4, 2, 2, 3)
    assert table.dtype == np.float32
    # Step 1 (pass 0, last layer): j = 1 targets step 2 = layer 0 of pass 1.
    np.testing.assert_array_equal(table[0, 1, 0], one_hot(0, 2))
    np.testing.assert_array_equal(table[0, 1, 1], one_hot(1))
    np.testing.assert_array_equal(table[0, 0, 0], one_hot(1))
    np.testing.assert_array_equal(table[2, 1, 1], one_hot(2))


def test_oracle_zero_past_last_step() -> None:
    table = oracle_scores(small_presence(), lookahead=2)
    np.testing.assert_array_equal(table[3, 1], 0.0)
    np.testing.assert_array_equal(table[3, 0, 1], 0.0)
    np.testing.assert_array_equal(table[3, 0, 0], one_hot(2))


def test_oracle_matches_every_step() -> None:
    presence = small_presence()
    table = oracle_scores(presence, lookahead=2)
    flat = presence.reshape(8, 3)
    for step in range(8):
        for offset in (1, 2):
            expected = flat[step + offset] if step + offset < 8 else np.zeros(3)
            np.testing.assert_array_equal(table[step // 2, step % 2, offset - 1], expected, err_msg=f"step {step} j {offset}")


def test_current_layer_hand_worked() -> None:
    table = current_layer_scores(small_presence(), lookahead=2)
    np.testing.assert_array_equal(table[1, 0, 0], one_hot(0, 2))  # step 2 predicts its own ids
    np.testing.assert_array_equal(table[1, 0, 1], one_hot(0, 2))
    np.testing.assert_array_equal(table[3, 0, 0], one_hot(1))
    np.testing.assert_array_equal(table[3, 0, 1], 0.0)  # s 6, t 8: past the last step
    np.testing.assert_array_equal(table[3, 1], 0.0)


def test_previous_pass_first_pass_zero() -> None:
    table = previous_pass_scores(small_presence(), lookahead=1)
    # Step 0 targets step 1, whose pass has no earlier pass.
    np.testing.assert_array_equal(table[0, 0, 0], 0.0)


def test_previous_pass_hand_worked() -> None:
    table = previous_pass_scores(small_presence(), lookahead=2)
    # Target t gets the requests of step t - 2.
    np.testing.assert_array_equal(table[0, 1, 0], one_hot(0))  # s 1, t 2 -> step 0
    np.testing.assert_array_equal(table[0, 1, 1], one_hot(1))  # s 1, t 3 -> step 1
    np.testing.assert_array_equal(table[1, 0, 0], one_hot(1))  # s 2, t 3 -> step 1
    np.testing.assert_array_equal(table[2, 1, 0], one_hot(2))  # s 5, t 6 -> step 4
    np.testing.assert_array_equal(table[0, 0, 1], one_hot(0))  # s 0, t 2 -> step 0
    np.testing.assert_array_equal(table[3, 1], 0.0)  # s 7: past the last step
    np.testing.assert_array_equal(table[3, 0, 1], 0.0)  # s 6, t 8: past the last step


def test_frequency_hand_worked() -> None:
    table = frequency_scores(small_presence(), lookahead=2, train_passes=2)
    # In training passes 0 and 1, layer 0 requests {0} and {0, 2}, and layer 1 requests {1} twice.
    layer0 = [1.0, 0.0, 0.5]
    layer1 = [0.0, 1.0, 0.0]
    np.testing.assert_array_equal(table[:2], 0.0)
    np.testing.assert_array_equal(table[2, 0, 0], layer1)
    np.testing.assert_array_equal(table[2, 0, 1], layer0)
    np.testing.assert_array_equal(table[2, 1, 0], layer0)  # wraps into pass 3
    np.testing.assert_array_equal(table[2, 1, 1], layer1)
    np.testing.assert_array_equal(table[3, 0, 0], layer1)
    np.testing.assert_array_equal(table[3, 0, 1], 0.0)
    np.testing.assert_array_equal(table[3, 1], 0.0)


def test_cooccurrence_transitions_hand_worked() -> None:
    transitions = cooccurrence_transitions(small_presence(), lookahead=2, train_passes=2)
    # j = 1 uses issuing steps 0, 1, 2 (step 3 would target step 4, an evaluation pass).
    # Layer 0: step 0 {0} -> {1}, step 2 {0, 2} -> {1}. Layer 1: step 1 {1} -> {0, 2}.
    np.testing.assert_array_equal(transitions[0, 0, 0], one_hot(1))
    np.testing.assert_array_equal(transitions[0, 0, 1], 0.0)
    np.testing.assert_array_equal(transitions[0, 0, 2], one_hot(1))
    np.testing.assert_array_equal(transitions[0, 1, 1], one_hot(0, 2))
    np.testing.assert_array_equal(transitions[0, 1, 0], 0.0)
    # j = 2 uses issuing steps 0, 1: step 0 {0} -> {0, 2}, step 1 {1} -> {1}.
    np.testing.assert_array_equal(transitions[1, 0, 0], one_hot(0, 2))
    np.testing.assert_array_equal(transitions[1, 0, 2], 0.0)
    np.testing.assert_array_equal(transitions[1, 1, 1], one_hot(1))


def test_cooccurrence_fraction_of_issues() -> None:
    # Expert 0 at layer 0 issues twice (steps 0 and 2, training) and is followed by expert 1 once.
    presence = np.zeros((3, 2, 2), dtype=bool)
    presence[0, 0, 0] = presence[0, 1, 1] = True
    presence[1, 0, 0] = presence[1, 1, 0] = True
    presence[2, 0, 1] = True
    transitions = cooccurrence_transitions(presence, lookahead=1, train_passes=2)
    np.testing.assert_allclose(transitions[0, 0, 0], [0.5, 0.5])


def test_cooccurrence_scores_hand_worked() -> None:
    table = cooccurrence_scores(small_presence(), lookahead=2, train_passes=2)
    np.testing.assert_array_equal(table[:2], 0.0)
    np.testing.assert_array_equal(table[2, 0, 0], one_hot(1))  # s 4 {2}: P[j1, l0, 2]
    np.testing.assert_array_equal(table[2, 0, 1], 0.0)  # s 4 {2}: P[j2, l0, 2] = 0
    np.testing.assert_allclose(table[2, 1, 0], [0.5, 0.0, 0.5])  # s 5 {0, 1}: mean of 0 and {0, 2}
    np.testing.assert_allclose(table[2, 1, 1], [0.0, 0.5, 0.0])  # s 5 {0, 1}: mean of 0 and {1}
    np.testing.assert_array_equal(table[3, 0, 0], 0.0)  # s 6 {1}: expert 1 never issued at layer 0
    np.testing.assert_array_equal(table[3, 0, 1], 0.0)  # s 6, t 8: past the last step
    np.testing.assert_array_equal(table[3, 1], 0.0)


def test_cooccurrence_step_without_requests() -> None:
    presence = small_presence()
    presence[2, 1] = False
    table = cooccurrence_scores(presence, lookahead=1, train_passes=2)
    np.testing.assert_array_equal(table[2, 1], 0.0)


def test_cooccurrence_ignores_evaluation_passes() -> None:
    presence = small_presence()
    base = cooccurrence_scores(presence, lookahead=2, train_passes=2)
    changed = presence.copy()
    changed[2, 0, 0] = True  # step 4, the first step of an evaluation pass
    after = cooccurrence_scores(changed, lookahead=2, train_passes=2)
    np.testing.assert_array_equal(
        cooccurrence_transitions(changed, 2, 2), cooccurrence_transitions(presence, 2, 2)
    )
    flat_before = base.reshape(8, 2, 3)
    flat_after = after.reshape(8, 2, 3)
    for step in range(8):
        if step != 4:
            np.testing.assert_array_equal(flat_after[step], flat_before[step], err_msg=f"step {step}")
    assert not np.array_equal(flat_after[4], flat_before[4])


def test_cooccurrence_random_evaluation_passes() -> None:
    generator = np.random.default_rng(0)
    presence = generator.random((10, 3, 5)) < 0.4
    changed = presence.copy()
    changed[6:] = generator.random((4, 3, 5)) < 0.4
    np.testing.assert_array_equal(
        cooccurrence_transitions(changed, 3, 6), cooccurrence_transitions(presence, 3, 6)
    )


def test_frequency_ignores_evaluation_passes() -> None:
    presence = small_presence()
    changed = presence.copy()
    changed[2:] = ~changed[2:]
    np.testing.assert_array_equal(frequency_scores(changed, 2, 2), frequency_scores(presence, 2, 2))


def speculative_trace():
    # Pass 0 is a prefill of tokens 0 and 1, and pass 1 is token 2 (3 layers, 3 experts, top-1).
    ids = np.array([[[0], [1], [2]], [[1], [2], [0]], [[2], [MISSING_EXPERT], [1]]])
    missing = np.zeros((3, 3), dtype=bool)
    missing[2, 1] = True
    speculative = np.full((3, 3, 3), np.nan, dtype=np.float32)
    speculative[0, 0] = [0.0, 0.0, np.log(2.0)]  # softmax [0.25, 0.25, 0.5]
    speculative[1, 0] = [np.log(3.0), 0.0, 0.0]  # softmax [0.6, 0.2, 0.2]
    speculative[0, 1] = [0.0, 0.0, 0.0]
    speculative[1, 1] = [0.0, 0.0, 0.0]
    speculative[2, 0] = [5.0, 5.0, 5.0]
    # Token 2 at layer 1 is a missing cell, so its logits stay NaN.
    return make_trace(
        ids, TraceMetadata("tiny", 3, 3, 1, "test"), missing=missing,
        pass_offsets=np.array([0, 2, 3]), pass_kind=np.array([PASS_PREFILL, PASS_DECODE]),
        speculative_logits=speculative,
    )


def test_gate_speculative_hand_worked() -> None:
    table = gate_speculative_scores(speculative_trace(), lookahead=2)
    assert table.shape == (2, 3, 2, 3)
    np.testing.assert_allclose(table[0, 0, 0], [0.425, 0.225, 0.35], rtol=1e-6)
    np.testing.assert_allclose(table[0, 1, 0], [1 / 3, 1 / 3, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(table[1, 0, 0], [1 / 3, 1 / 3, 1 / 3], rtol=1e-6)


def test_gate_speculative_unfilled_rows_zero() -> None:
    table = gate_speculative_scores(speculative_trace(), lookahead=2)
    np.testing.assert_array_equal(table[:, :, 1], 0.0)  # only j = 1 is filled
    np.testing.assert_array_equal(table[:, 2], 0.0)  # last layer: no speculative logits
    np.testing.assert_array_equal(table[1, 1, 0], 0.0)  # the pass's only token is a missing cell


def test_gate_speculative_without_logits() -> None:
    trace = make_trace(np.zeros((2, 2, 1), dtype=np.int16), TraceMetadata("no-logits", 2, 2, 1, "test.npz"))
    with pytest.raises(ValueError, match=re.escape("trace no-logits (test.npz) has no speculative_logits")):
        gate_speculative_scores(trace, lookahead=1)


def test_flame_tables(flame_npz: Path) -> None:
    trace = load_any(str(flame_npz))
    presence = request_presence(trace)
    train_passes = train_pass_count(trace.num_passes, 0.75)
    assert train_passes == 1536
    tables = {
        "oracle": oracle_scores(presence, 3),
        "previous-pass": previous_pass_scores(presence, 3),
        "frequency": frequency_scores(presence, 3, train_passes),
        "co-occurrence": cooccurrence_scores(presence, 3, train_passes),
    }
    for name, table in tables.items():
        assert table.shape == (2048, 8, 3, 64), name
        assert table.dtype == np.float32, name
        assert not np.isnan(table).any(), name
        assert (table >= 0).all(), name
        np.testing.assert_array_equal(table[-1, -1], 0.0, err_msg=name)
    for name in ("frequency", "co-occurrence"):
        np.testing.assert_array_equal(tables[name][:train_passes], 0.0, err_msg=name)
        assert tables[name][train_passes:, :, :, :].sum() > 0, name
    # Every step of FLAME requests top-6 experts of one token, so each oracle row sums to 6.
    np.testing.assert_array_equal(tables["oracle"][:-1].sum(axis=-1), 6.0)


@pytest.mark.parametrize("lookahead", [0, 3, -1])
def test_lookahead_out_of_range(lookahead: int) -> None:
    with pytest.raises(ValueError, match=re.escape(f"lookahead: expected 1 <= lookahead <= 2 (the layer count), got {lookahead}")):
        oracle_scores(small_presence(), lookahead)


def test_lookahead_not_integer() -> None:
    with pytest.raises(ValueError, match="lookahead: expected an integer, got 1.5"):
        previous_pass_scores(small_presence(), 1.5)


@pytest.mark.parametrize("train_passes", [0, 4, 5])
def test_train_passes_out_of_range(train_passes: int) -> None:
    with pytest.raises(ValueError, match=re.escape(f"train_passes: expected 1 <= train_passes < 4 (the pass count), got {train_passes}")):
        frequency_scores(small_presence(), 1, train_passes)
    with pytest.raises(ValueError, match=re.escape(f"got {train_passes}")):
        cooccurrence_scores(small_presence(), 1, train_passes)


def test_presence_wrong_dtype() -> None:
    with pytest.raises(ValueError, match="presence: expected dtype bool, got int64"):
        oracle_scores(np.zeros((2, 2, 3), dtype=np.int64), 1)


def test_presence_wrong_shape() -> None:
    with pytest.raises(ValueError, match=re.escape("presence: expected shape (T, L, E) with every axis >= 1, got (2, 3)")):
        oracle_scores(np.zeros((2, 3), dtype=bool), 1)


def test_train_pass_count() -> None:
    assert train_pass_count(2048, 0.75) == 1536
    assert train_pass_count(10, 0.99) == 9
    with pytest.raises(ValueError, match="leaves 0 passes to train on"):
        train_pass_count(3, 0.2)
    with pytest.raises(ValueError, match="leaves no pass to evaluate"):
        train_pass_count(3, 1.0)
    with pytest.raises(ValueError, match=re.escape("train_fraction: expected a number in (0, 1), got 1.5")):
        train_pass_count(3, 1.5)


def test_table_size_limit() -> None:
    with pytest.raises(ValueError, match=re.escape("score table of shape (4, 2, 2, 3) (T, L, D, E) needs 192 bytes, more than max_bytes=100")):
        oracle_scores(small_presence(), 2, max_bytes=100)
    check_table_size(4, 2, 2, 3, max_bytes=192)
    with pytest.raises(ValueError, match="max_bytes=100"):
        cooccurrence_scores(small_presence(), 2, 2, max_bytes=100)

"""Tests of the FLAME-MoE and Mixtral loaders and of format detection in `load_any`."""

from __future__ import annotations

import json
import logging
import re
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from specmd_jax.traces.flame import load_flame_npz
from specmd_jax.traces.io import load_any
from specmd_jax.traces.mixtral import load_mixtral_jsonl
from specmd_jax.traces.trace import (
    MISSING_EXPERT,
    PASS_DECODE,
    Trace,
    TraceError,
    TraceMetadata,
    load_trace,
    make_trace,
    save_trace,
)


def error_pattern(path: Path, field: str, index: object, expected: str, actual: object, line: int | None = None) -> str:
    """Regex for the project's error layout, with every part matched literally."""
    location = f" line {line}:" if line is not None else ""
    where = f" at index {index}" if index is not None else ""
    return re.escape(f"{path}:{location} field '{field}'{where}: expected {expected}, got {actual}")


def corrupt_member(path: Path, member: str) -> None:
    """Overwrite the first byte of a compressed member with an invalid deflate block type."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    data = bytearray(path.read_bytes())
    name_length = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_length = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_length + extra_length
    data[start] = 0xFF
    path.write_bytes(bytes(data))


# FLAME-MoE npz --------------------------------------------------------------------------------------


def flame_arrays(num_layers: int = 3, num_tokens: int = 5, top_k: int = 2) -> dict[str, np.ndarray]:
    """Valid FLAME-MoE arrays with distinct, predictable experts and probabilities."""
    layer = np.arange(num_layers)[:, None, None]
    token = np.arange(num_tokens)[None, :, None]
    rank = np.arange(top_k)[None, None, :]
    expert_ids = (7 * layer + 3 * token + rank) % 64
    probs = 0.5 / (rank + 1) + 0.001 * token + 0.01 * layer
    return {
        "layers": np.arange(2, 2 + num_layers, dtype=np.int16),
        "token_ids": np.arange(100, 100 + num_tokens, dtype=np.int32),
        "expert_ids": expert_ids.astype(np.int16),
        "probs": probs.astype(np.float32),
        "stream_offset": np.arange(num_tokens, dtype=np.int32),
    }


def write_flame(path: Path, **changes: np.ndarray | None) -> Path:
    """Write FLAME arrays with some replaced, where a change of None removes that key."""
    arrays = flame_arrays()
    for key, value in changes.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    # np.savez appends ".npz" to a path without it, so the file is written through a handle.
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def test_flame_real_file_dimensions(flame_npz: Path) -> None:
    trace = load_flame_npz(flame_npz)
    assert trace.num_passes == 2048
    assert trace.num_tokens == 2048
    assert trace.num_layers == 8
    assert trace.num_experts == 64
    assert trace.top_k == 6
    assert trace.num_missing_cells == 0
    assert trace.metadata.layer_ids == (2, 3, 4, 5, 6, 7, 8, 9)
    assert trace.metadata.source == str(flame_npz)
    assert np.all(trace.pass_kind == PASS_DECODE)
    assert np.all(trace.pass_sequence == 0)


def test_flame_real_file_arrays(flame_npz: Path) -> None:
    trace = load_flame_npz(flame_npz)
    with np.load(flame_npz) as archive:
        expert_ids = archive["expert_ids"]
        probs = archive["probs"]
    assert trace.expert_ids.dtype == np.int16
    assert trace.scores.dtype == np.float32
    assert np.array_equal(trace.expert_ids, expert_ids.transpose(1, 0, 2))
    assert np.array_equal(trace.scores, probs.transpose(1, 0, 2))


def test_flame_small_file_layout(tmp_path: Path) -> None:
    path = write_flame(tmp_path / "flame.npz")
    arrays = flame_arrays()
    trace = load_flame_npz(path)
    assert trace.num_passes == 5
    assert trace.metadata.layer_ids == (2, 3, 4)
    assert trace.top_k == 2
    # Token 4 at layer index 1 comes from file position [1, 4].
    assert trace.expert_ids[4, 1].tolist() == arrays["expert_ids"][1, 4].tolist()
    assert trace.scores[4, 1].tolist() == arrays["probs"][1, 4].tolist()
    assert trace.pass_offsets.tolist() == [0, 1, 2, 3, 4, 5]


def test_flame_float64_probs_become_float32(tmp_path: Path) -> None:
    probs = flame_arrays()["probs"].astype(np.float64)
    trace = load_flame_npz(write_flame(tmp_path / "flame.npz", probs=probs))
    assert trace.scores.dtype == np.float32
    assert np.array_equal(trace.scores, probs.transpose(1, 0, 2).astype(np.float32))


@pytest.mark.parametrize("key", ["layers", "token_ids", "expert_ids", "probs", "stream_offset"])
def test_flame_missing_key(tmp_path: Path, key: str) -> None:
    path = write_flame(tmp_path / "flame.npz", **{key: None})
    with pytest.raises(TraceError, match=re.escape(f"{path}: field '{key}': expected the keys ")) as info:
        load_flame_npz(path)
    assert "got no such key (the archive has" in str(info.value)


def test_flame_unknown_key(tmp_path: Path) -> None:
    path = write_flame(tmp_path / "flame.npz", router_logits=np.zeros((3, 5, 64), np.float32))
    with pytest.raises(TraceError, match=re.escape(f"{path}: field 'router_logits': expected only the keys ")) as info:
        load_flame_npz(path)
    assert "got unknown keys ['router_logits']" in str(info.value)


def test_flame_expert_ids_float_dtype(tmp_path: Path) -> None:
    path = write_flame(tmp_path / "flame.npz", expert_ids=flame_arrays()["expert_ids"].astype(np.float32))
    with pytest.raises(TraceError, match=error_pattern(path, "expert_ids", None, "an integer dtype", "dtype float32")):
        load_flame_npz(path)


def test_flame_probs_integer_dtype(tmp_path: Path) -> None:
    path = write_flame(tmp_path / "flame.npz", probs=np.zeros((3, 5, 2), np.int32))
    with pytest.raises(TraceError, match=error_pattern(path, "probs", None, "a float dtype", "dtype int32")):
        load_flame_npz(path)


def test_flame_expert_ids_two_dimensions(tmp_path: Path) -> None:
    path = write_flame(tmp_path / "flame.npz", expert_ids=np.zeros((5, 2), np.int16))
    with pytest.raises(TraceError, match=error_pattern(path, "expert_ids", None, "3 dimensions", "shape (5, 2)")):
        load_flame_npz(path)


def test_flame_probs_shape_differs(tmp_path: Path) -> None:
    path = write_flame(tmp_path / "flame.npz", probs=np.full((3, 4, 2), 0.1, np.float32))
    expected = "shape (3, 5, 2) (the shape of 'expert_ids')"
    with pytest.raises(TraceError, match=error_pattern(path, "probs", None, expected, "shape (3, 4, 2)")):
        load_flame_npz(path)


def test_flame_token_ids_length_differs(tmp_path: Path) -> None:
    path = write_flame(tmp_path / "flame.npz", token_ids=np.arange(6, dtype=np.int32))
    expected = "shape (5,) (one entry per token of 'expert_ids')"
    with pytest.raises(TraceError, match=error_pattern(path, "token_ids", None, expected, "shape (6,)")):
        load_flame_npz(path)


def test_flame_stream_offset_length_differs(tmp_path: Path) -> None:
    path = write_flame(tmp_path / "flame.npz", stream_offset=np.arange(4, dtype=np.int32))
    expected = "shape (5,) (one entry per token of 'expert_ids')"
    with pytest.raises(TraceError, match=error_pattern(path, "stream_offset", None, expected, "shape (4,)")):
        load_flame_npz(path)


def test_flame_layer_count_differs(tmp_path: Path) -> None:
    path = write_flame(tmp_path / "flame.npz", layers=np.arange(2, 6, dtype=np.int16))
    expected = "shape (4, tokens, k) with one row per entry of 'layers'"
    with pytest.raises(TraceError, match=error_pattern(path, "expert_ids", None, expected, "shape (3, 5, 2)")):
        load_flame_npz(path)


def test_flame_layers_not_increasing(tmp_path: Path) -> None:
    path = write_flame(tmp_path / "flame.npz", layers=np.array([2, 4, 3], np.int16))
    with pytest.raises(TraceError, match=error_pattern(path, "layers", 2, "a layer number > 4 (increasing order)", 3)):
        load_flame_npz(path)


def test_flame_negative_layer(tmp_path: Path) -> None:
    path = write_flame(tmp_path / "flame.npz", layers=np.array([-1, 0, 1], np.int16))
    with pytest.raises(TraceError, match=error_pattern(path, "layers", 0, "a layer number >= 0", -1)):
        load_flame_npz(path)


def test_flame_stream_offset_not_increasing(tmp_path: Path) -> None:
    path = write_flame(tmp_path / "flame.npz", stream_offset=np.array([0, 1, 2, 2, 3], np.int32))
    expected = "an offset > 2 (tokens in stream order)"
    with pytest.raises(TraceError, match=error_pattern(path, "stream_offset", 3, expected, 2)):
        load_flame_npz(path)


def test_flame_zero_tokens(tmp_path: Path) -> None:
    path = tmp_path / "flame.npz"
    np.savez(path, **flame_arrays(num_tokens=0))
    with pytest.raises(TraceError, match=error_pattern(path, "expert_ids", None, "at least one token", "shape (3, 0, 2)")):
        load_flame_npz(path)


@pytest.mark.parametrize("bad_id", [64, -1])
def test_flame_expert_id_out_of_range(tmp_path: Path, bad_id: int) -> None:
    expert_ids = flame_arrays()["expert_ids"]
    expert_ids[1, 3, 1] = bad_id
    path = write_flame(tmp_path / "flame.npz", expert_ids=expert_ids)
    with pytest.raises(TraceError, match=error_pattern(path, "expert_ids", (1, 3, 1), "an expert id in [0, 64)", bad_id)):
        load_flame_npz(path)


def test_flame_duplicate_experts(tmp_path: Path) -> None:
    expert_ids = flame_arrays()["expert_ids"]
    expert_ids[2, 4] = [9, 9]
    path = write_flame(tmp_path / "flame.npz", expert_ids=expert_ids)
    with pytest.raises(TraceError, match=error_pattern(path, "expert_ids", (2, 4), "distinct experts within one top-k", [9, 9])):
        load_flame_npz(path)


@pytest.mark.parametrize("bad_prob", [np.nan, -0.25, np.inf, 1.5])
def test_flame_invalid_probability(tmp_path: Path, bad_prob: float) -> None:
    probs = flame_arrays()["probs"]
    probs[0, 1, 1] = bad_prob
    path = write_flame(tmp_path / "flame.npz", probs=probs)
    expected = "a finite probability in [0, 1]"
    with pytest.raises(TraceError, match=error_pattern(path, "probs", (0, 1, 1), expected, float(bad_prob))):
        load_flame_npz(path)


def test_flame_pickled_member(tmp_path: Path) -> None:
    path = tmp_path / "flame.npz"
    arrays = flame_arrays()
    arrays["token_ids"] = np.array([{"token": 1}] * 5, dtype=object)
    np.savez(path, **arrays)
    with pytest.raises(TraceError, match=re.escape(f"{path}: truncated or corrupt .npz member")):
        load_flame_npz(path)


def test_flame_corrupt_member(tmp_path: Path) -> None:
    path = tmp_path / "flame.npz"
    np.savez_compressed(path, **flame_arrays())
    corrupt_member(path, "probs.npy")
    with pytest.raises(TraceError, match=re.escape(f"{path}: truncated or corrupt .npz member")):
        load_flame_npz(path)


def test_flame_truncated_file(tmp_path: Path) -> None:
    path = write_flame(tmp_path / "flame.npz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match=re.escape(f"{path}: truncated or corrupt .npz archive")):
        load_flame_npz(path)


def test_flame_text_file(tmp_path: Path) -> None:
    path = tmp_path / "flame.npz"
    path.write_text("layers,expert_ids\n2,5\n")
    with pytest.raises(TraceError, match=re.escape(f"{path}: not an .npz archive")):
        load_flame_npz(path)


def test_flame_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "flame.npz"
    path.write_bytes(b"")
    with pytest.raises(TraceError, match=re.escape(f"{path}: empty file")):
        load_flame_npz(path)


def test_flame_directory(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=re.escape(f"{tmp_path}: is a directory")):
        load_flame_npz(tmp_path)


def test_flame_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "absent.npz"
    with pytest.raises(TraceError, match=re.escape(f"{path}: file not found")):
        load_flame_npz(path)


# Mixtral JSONL --------------------------------------------------------------------------------------


def mixtral_row(problem: int = 0, layer: int = 0, token: int = 0, experts: object = None, probs: object = None) -> dict:
    return {
        "dataset": "humaneval",
        "problem_id": problem,
        "layer": layer,
        "experts": [(problem + layer + token) % 8, (problem + layer + token + 3) % 8] if experts is None else experts,
        "gating_probs": [0.75, 0.25] if probs is None else probs,
        "token_idx": token,
    }


def complete_rows(tokens_per_problem: dict[int, int], num_layers: int = 2) -> list[dict]:
    """One row for every (problem, layer, token), in the source's layer-major order."""
    return [
        mixtral_row(problem, layer, token)
        for problem, num_tokens in tokens_per_problem.items()
        for layer in range(num_layers)
        for token in range(num_tokens)
    ]


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    """Write one line per row; a str row is written verbatim."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("".join(line + "\n" for line in lines))
    return path


def write_with_bad_line(path: Path, bad: dict | str) -> Path:
    """Write 3 valid rows, then `bad` as line 4."""
    return write_jsonl(path, [*complete_rows({0: 3}, num_layers=1), bad])


def test_mixtral_real_file_dimensions(mixtral_jsonl: Path) -> None:
    trace = load_mixtral_jsonl(mixtral_jsonl)
    assert trace.num_passes == 83 + 255
    assert trace.num_layers == 32
    assert trace.num_experts == 8
    assert trace.top_k == 2
    assert trace.num_missing_cells == 338 * 32 - 10779
    assert trace.num_missing_cells == 37
    assert np.unique(trace.pass_sequence).tolist() == [0, 1]
    assert trace.metadata.model == "mixtral-8x7b-instruct"
    assert str(mixtral_jsonl) in trace.metadata.source
    assert "humaneval" in trace.metadata.source


def test_mixtral_real_problem_order(mixtral_jsonl: Path) -> None:
    trace = load_mixtral_jsonl(mixtral_jsonl)
    assert np.all(trace.pass_sequence[:83] == 0)
    assert np.all(trace.pass_sequence[83:] == 1)
    assert np.all(trace.pass_kind == PASS_DECODE)


def test_mixtral_real_known_row(mixtral_jsonl: Path) -> None:
    trace = load_mixtral_jsonl(mixtral_jsonl)
    assert trace.expert_ids[0, 0].tolist() == [6, 5]
    assert not trace.missing[0, 0]
    expected_scores = np.array([0.6959583759307861, 0.30404168367385864], dtype=np.float32)
    assert np.array_equal(trace.scores[0, 0], expected_scores)


def test_mixtral_real_every_row_placed(mixtral_jsonl: Path) -> None:
    trace = load_mixtral_jsonl(mixtral_jsonl)
    first_pass = {0: 0, 1: 83}
    placed = np.zeros_like(trace.missing)
    with open(mixtral_jsonl) as handle:
        for line in handle:
            row = json.loads(line)
            index = (first_pass[row["problem_id"]] + row["token_idx"], row["layer"])
            assert trace.expert_ids[index].tolist() == row["experts"]
            placed[index] = True
    assert np.array_equal(trace.missing, ~placed)
    assert np.all(trace.expert_ids[trace.missing] == MISSING_EXPERT)
    assert np.all(np.isnan(trace.scores[trace.missing]))


def test_mixtral_real_missing_count_logged(mixtral_jsonl: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="specmd_jax.traces.mixtral"):
        load_mixtral_jsonl(mixtral_jsonl)
    assert "37 of 10816 (pass, layer) cells" in caplog.text


def test_mixtral_default_layer_count(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "routing.jsonl", complete_rows({0: 3}))
    trace = load_mixtral_jsonl(path)
    assert trace.num_layers == 32
    assert trace.metadata.layer_ids == tuple(range(32))
    assert not trace.missing[:, :2].any()
    assert trace.missing[:, 2:].all()
    assert trace.num_missing_cells == 3 * 30


def test_mixtral_layer_beyond_model(tmp_path: Path) -> None:
    path = write_with_bad_line(tmp_path / "routing.jsonl", mixtral_row(0, 32, 0))
    expected = "a layer id in [0, 32) (the model's MoE layer count; pass num_layers=None to infer it)"
    with pytest.raises(TraceError, match=error_pattern(path, "layer", None, expected, 32, line=4)):
        load_mixtral_jsonl(path)


def test_mixtral_layer_beyond_given_count(tmp_path: Path) -> None:
    path = write_with_bad_line(tmp_path / "routing.jsonl", mixtral_row(0, 4, 0))
    expected = "a layer id in [0, 4) (the model's MoE layer count; pass num_layers=None to infer it)"
    with pytest.raises(TraceError, match=error_pattern(path, "layer", None, expected, 4, line=4)):
        load_mixtral_jsonl(path, num_layers=4)
    assert load_mixtral_jsonl(path, num_layers=5).num_layers == 5


def test_mixtral_inferred_layer_count(tmp_path: Path) -> None:
    path = write_with_bad_line(tmp_path / "routing.jsonl", mixtral_row(0, 40, 0))
    trace = load_mixtral_jsonl(path, num_layers=None)
    assert trace.num_layers == 41
    assert trace.metadata.layer_ids == tuple(range(41))
    assert not trace.missing[0, 40]


def test_mixtral_num_experts_option(tmp_path: Path) -> None:
    path = write_with_bad_line(tmp_path / "routing.jsonl", mixtral_row(0, 0, 3, experts=[12, 1]))
    with pytest.raises(TraceError, match=error_pattern(path, "experts", None, "an expert id in [0, 8)", 12, line=4)):
        load_mixtral_jsonl(path)
    trace = load_mixtral_jsonl(path, num_experts=16)
    assert trace.num_experts == 16
    assert trace.expert_ids[3, 0].tolist() == [12, 1]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"num_layers": 0}, "num_layers: expected a positive integer or None, got 0"),
        ({"num_layers": True}, "num_layers: expected a positive integer or None, got True"),
        ({"num_layers": 2.0}, "num_layers: expected a positive integer or None, got 2.0"),
        ({"num_experts": 1}, "num_experts: expected an integer in [2, 32767] (int16 expert ids), got 1"),
        ({"num_experts": 40000}, "num_experts: expected an integer in [2, 32767] (int16 expert ids), got 40000"),
    ],
)
def test_mixtral_invalid_arguments(tmp_path: Path, arguments: dict, message: str) -> None:
    path = write_jsonl(tmp_path / "routing.jsonl", complete_rows({0: 1}))
    with pytest.raises(ValueError, match=re.escape(message)):
        load_mixtral_jsonl(path, **arguments)


CELL_LIMIT_TEXT = "because a value far beyond the rows present would create mostly missing cells"


def test_mixtral_cell_limit_boundary(tmp_path: Path) -> None:
    # One row at token 1 gives 2 passes x 32 layers = 64 cells, the most allowed for one row.
    trace = load_mixtral_jsonl(write_jsonl(tmp_path / "ok.jsonl", [mixtral_row(0, 0, 1)]))
    assert trace.num_passes == 2
    path = write_jsonl(tmp_path / "over.jsonl", [mixtral_row(0, 0, 2)])
    expected = f"at most 64 (pass, layer) cells per row of the file (64 cells for 1 rows), {CELL_LIMIT_TEXT}"
    with pytest.raises(TraceError, match=error_pattern(path, "token_idx", None, expected, "2, which makes 3 passes x 32 layers = 96 cells", line=1)):
        load_mixtral_jsonl(path)


@pytest.mark.parametrize("token", [100_000, 2_147_483_647])
def test_mixtral_huge_token_idx(tmp_path: Path, token: int) -> None:
    path = write_with_bad_line(tmp_path / "routing.jsonl", mixtral_row(0, 0, token))
    passes = token + 1
    expected = f"at most 64 (pass, layer) cells per row of the file (256 cells for 4 rows), {CELL_LIMIT_TEXT}"
    actual = f"{token}, which makes {passes} passes x 32 layers = {passes * 32} cells"
    with pytest.raises(TraceError, match=error_pattern(path, "token_idx", None, expected, actual, line=4)):
        load_mixtral_jsonl(path)


def test_mixtral_huge_inferred_layer(tmp_path: Path) -> None:
    path = write_with_bad_line(tmp_path / "routing.jsonl", mixtral_row(0, 100_000, 0))
    expected = f"at most 64 (pass, layer) cells per row of the file (256 cells for 4 rows), {CELL_LIMIT_TEXT}"
    actual = "100000, which makes 3 passes x 100001 layers = 300003 cells"
    with pytest.raises(TraceError, match=error_pattern(path, "layer", None, expected, actual, line=4)):
        load_mixtral_jsonl(path, num_layers=None)


def test_mixtral_small_file_layout(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "routing.jsonl", complete_rows({0: 3, 1: 2}))
    trace = load_mixtral_jsonl(path, num_layers=None)
    assert trace.num_passes == 5
    assert trace.num_layers == 2
    assert trace.num_missing_cells == 0
    assert trace.pass_sequence.tolist() == [0, 0, 0, 1, 1]
    assert trace.pass_offsets.tolist() == [0, 1, 2, 3, 4, 5]
    # Problem 1, layer 1, token 1 lands at pass 3 + 1.
    assert trace.expert_ids[4, 1].tolist() == mixtral_row(1, 1, 1)["experts"]
    assert trace.scores[4, 1].tolist() == [0.75, 0.25]


def test_mixtral_row_order_irrelevant(tmp_path: Path) -> None:
    rows = complete_rows({0: 3, 1: 2})
    ordered = load_mixtral_jsonl(write_jsonl(tmp_path / "ordered.jsonl", rows), num_layers=None)
    shuffled = load_mixtral_jsonl(write_jsonl(tmp_path / "shuffled.jsonl", rows[::-1]), num_layers=None)
    assert np.array_equal(ordered.expert_ids, shuffled.expert_ids)
    assert np.array_equal(ordered.scores, shuffled.scores)
    assert np.array_equal(ordered.pass_sequence, shuffled.pass_sequence)


def test_mixtral_absent_row_is_missing_cell(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [row for row in complete_rows({0: 3}) if (row["layer"], row["token_idx"]) != (1, 2)]
    path = write_jsonl(tmp_path / "routing.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="specmd_jax.traces.mixtral"):
        trace = load_mixtral_jsonl(path, num_layers=None)
    assert trace.num_missing_cells == 1
    assert trace.missing[2, 1]
    assert trace.expert_ids[2, 1].tolist() == [MISSING_EXPERT, MISSING_EXPERT]
    assert np.all(np.isnan(trace.scores[2, 1]))
    assert "1 of 6 (pass, layer) cells" in caplog.text


def test_mixtral_token_without_rows_is_empty_pass(tmp_path: Path) -> None:
    rows = [row for row in complete_rows({0: 4}) if row["token_idx"] != 1]
    trace = load_mixtral_jsonl(write_jsonl(tmp_path / "routing.jsonl", rows), num_layers=None)
    assert trace.num_passes == 4
    assert trace.missing[1].tolist() == [True, True]
    assert trace.num_missing_cells == 2
    assert not trace.missing[[0, 2, 3]].any()


def test_mixtral_tokens_before_first_row_are_passes(tmp_path: Path) -> None:
    rows = [mixtral_row(0, 0, 2), mixtral_row(0, 1, 2)]
    trace = load_mixtral_jsonl(write_jsonl(tmp_path / "routing.jsonl", rows), num_layers=None)
    assert trace.num_passes == 3
    assert trace.missing.tolist() == [[True, True], [True, True], [False, False]]


def test_mixtral_layer_counts_differ_between_problems(tmp_path: Path) -> None:
    rows = complete_rows({0: 2}, num_layers=3) + complete_rows({1: 2}, num_layers=2)
    trace = load_mixtral_jsonl(write_jsonl(tmp_path / "routing.jsonl", rows), num_layers=None)
    assert trace.num_layers == 3
    assert trace.missing[:, 2].tolist() == [False, False, True, True]
    assert trace.num_missing_cells == 2


def test_mixtral_problem_id_gap(tmp_path: Path) -> None:
    rows = complete_rows({5: 1}) + complete_rows({2: 2})
    trace = load_mixtral_jsonl(write_jsonl(tmp_path / "routing.jsonl", rows))
    assert trace.pass_sequence.tolist() == [2, 2, 5]


def test_mixtral_blank_lines_skipped(tmp_path: Path) -> None:
    path = tmp_path / "routing.jsonl"
    rows = [json.dumps(row) for row in complete_rows({0: 2})]
    path.write_text("\n" + "\n\n".join(rows) + "\n  \n")
    assert load_mixtral_jsonl(path).num_passes == 2


def test_mixtral_invalid_json(tmp_path: Path) -> None:
    path = write_with_bad_line(tmp_path / "routing.jsonl", '{"dataset": "humaneval", "layer": }')
    pattern = error_pattern(path, "row", None, "a JSON object", "invalid JSON (Expecting value at column 35)", line=4)
    with pytest.raises(TraceError, match=pattern):
        load_mixtral_jsonl(path)


def test_mixtral_truncated_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "routing.jsonl", complete_rows({0: 3}))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])
    with pytest.raises(TraceError, match=re.escape(f"{path}: line 6: field 'row': expected a JSON object, got invalid JSON")):
        load_mixtral_jsonl(path)


def test_mixtral_cut_line_column(tmp_path: Path) -> None:
    # The line keeps its line break, as when a writer was cut off and later rows were appended.
    cut = json.dumps(mixtral_row(0, 0, 3))[:40]
    path = write_with_bad_line(tmp_path / "routing.jsonl", cut)
    pattern = error_pattern(path, "row", None, "a JSON object", "invalid JSON (Expecting ',' delimiter at column 41)", line=4)
    with pytest.raises(TraceError, match=pattern):
        load_mixtral_jsonl(path)


def test_mixtral_unterminated_string_message(tmp_path: Path) -> None:
    path = write_with_bad_line(tmp_path / "routing.jsonl", '{"dataset": "humaneval", "layer": 0, "experts": "ab')
    pattern = error_pattern(path, "row", None, "a JSON object", "invalid JSON (Unterminated string starting at column 49)", line=4)
    with pytest.raises(TraceError, match=pattern):
        load_mixtral_jsonl(path)


def test_mixtral_duplicate_key(tmp_path: Path) -> None:
    line = json.dumps(mixtral_row(0, 0, 3)).replace('"layer": 0', '"layer": 0, "layer": 1')
    path = write_with_bad_line(tmp_path / "routing.jsonl", line)
    with pytest.raises(TraceError, match=error_pattern(path, "layer", None, "each key once per row", "2 values (0, 1)", line=4)):
        load_mixtral_jsonl(path)


def test_mixtral_duplicate_nested_key(tmp_path: Path) -> None:
    line = json.dumps({**mixtral_row(0, 0, 3), "extra": {"a": 1}}).replace('"a": 1', '"a": 1, "a": 2')
    path = write_with_bad_line(tmp_path / "routing.jsonl", line)
    with pytest.raises(TraceError, match=error_pattern(path, "a", None, "each key once per row", "2 values (1, 2)", line=4)):
        load_mixtral_jsonl(path)


def test_mixtral_line_not_object(tmp_path: Path) -> None:
    path = write_with_bad_line(tmp_path / "routing.jsonl", "[0, 1, 2]")
    with pytest.raises(TraceError, match=error_pattern(path, "row", None, "a JSON object", "an array [0, 1, 2]", line=4)):
        load_mixtral_jsonl(path)


@pytest.mark.parametrize("key", ["dataset", "problem_id", "layer", "experts", "gating_probs", "token_idx"])
def test_mixtral_missing_key(tmp_path: Path, key: str) -> None:
    row = mixtral_row(0, 0, 3)
    del row[key]
    path = write_with_bad_line(tmp_path / "routing.jsonl", row)
    with pytest.raises(TraceError, match=re.escape(f"{path}: line 4: field '{key}': expected the keys ")) as info:
        load_mixtral_jsonl(path)
    assert "got no such key (the row has" in str(info.value)


def test_mixtral_unknown_key(tmp_path: Path) -> None:
    path = write_with_bad_line(tmp_path / "routing.jsonl", {**mixtral_row(0, 0, 3), "logits": [1.0]})
    with pytest.raises(TraceError, match=re.escape(f"{path}: line 4: field 'logits': expected only the keys ")) as info:
        load_mixtral_jsonl(path)
    assert "got unknown keys ['logits']" in str(info.value)


@pytest.mark.parametrize(
    ("key", "value", "actual"),
    [
        ("layer", 1.5, "a number 1.5"),
        ("layer", "1", 'a string "1"'),
        ("layer", True, "a boolean true"),
        ("token_idx", 3.0, "a number 3.0"),
        ("token_idx", None, "null"),
        ("problem_id", [0], "an array [0]"),
    ],
)
def test_mixtral_non_integer_index(tmp_path: Path, key: str, value: object, actual: str) -> None:
    path = write_with_bad_line(tmp_path / "routing.jsonl", {**mixtral_row(0, 0, 3), key: value})
    with pytest.raises(TraceError, match=error_pattern(path, key, None, "an integer", actual, line=4)):
        load_mixtral_jsonl(path)


@pytest.mark.parametrize("key", ["layer", "token_idx", "problem_id"])
def test_mixtral_negative_index(tmp_path: Path, key: str) -> None:
    path = write_with_bad_line(tmp_path / "routing.jsonl", {**mixtral_row(0, 0, 3), key: -1})
    with pytest.raises(TraceError, match=error_pattern(path, key, None, "an integer in [0, 2147483647]", -1, line=4)):
        load_mixtral_jsonl(path)


@pytest.mark.parametrize("key", ["experts", "gating_probs"])
def test_mixtral_list_length(tmp_path: Path, key: str) -> None:
    value = [1, 2, 3] if key == "experts" else [0.5]
    path = write_with_bad_line(tmp_path / "routing.jsonl", {**mixtral_row(0, 0, 3), key: value})
    expected = "2 entries (Mixtral routes each token to its top 2)"
    with pytest.raises(TraceError, match=error_pattern(path, key, None, expected, f"{len(value)} entries {value}", line=4)):
        load_mixtral_jsonl(path)


def test_mixtral_experts_not_list(tmp_path: Path) -> None:
    path = write_with_bad_line(tmp_path / "routing.jsonl", {**mixtral_row(0, 0, 3), "experts": 6})
    with pytest.raises(TraceError, match=error_pattern(path, "experts", None, "an array of 2 entries", "a number 6", line=4)):
        load_mixtral_jsonl(path)


@pytest.mark.parametrize("bad_id", [8, -1])
def test_mixtral_expert_id_out_of_range(tmp_path: Path, bad_id: int) -> None:
    path = write_with_bad_line(tmp_path / "routing.jsonl", mixtral_row(0, 0, 3, experts=[1, bad_id]))
    with pytest.raises(TraceError, match=error_pattern(path, "experts", None, "an expert id in [0, 8)", bad_id, line=4)):
        load_mixtral_jsonl(path)


def test_mixtral_expert_id_not_integer(tmp_path: Path) -> None:
    path = write_with_bad_line(tmp_path / "routing.jsonl", mixtral_row(0, 0, 3, experts=[1, 2.0]))
    with pytest.raises(TraceError, match=error_pattern(path, "experts", None, "integer expert ids", "a number 2.0", line=4)):
        load_mixtral_jsonl(path)


def test_mixtral_duplicate_experts(tmp_path: Path) -> None:
    path = write_with_bad_line(tmp_path / "routing.jsonl", mixtral_row(0, 0, 3, experts=[4, 4]))
    with pytest.raises(TraceError, match=error_pattern(path, "experts", None, "distinct experts within one top-k", [4, 4], line=4)):
        load_mixtral_jsonl(path)


@pytest.mark.parametrize(("literal", "actual"), [("NaN", "nan"), ("-0.25", "-0.25"), ("Infinity", "inf"), ("1.5", "1.5")])
def test_mixtral_invalid_gating_prob(tmp_path: Path, literal: str, actual: str) -> None:
    line = json.dumps(mixtral_row(0, 0, 3, probs=[0.75, 0.25])).replace("0.25", literal)
    path = write_with_bad_line(tmp_path / "routing.jsonl", line)
    expected = "a finite probability in [0, 1]"
    with pytest.raises(TraceError, match=error_pattern(path, "gating_probs", None, expected, actual, line=4)):
        load_mixtral_jsonl(path)


def test_mixtral_gating_prob_not_number(tmp_path: Path) -> None:
    path = write_with_bad_line(tmp_path / "routing.jsonl", mixtral_row(0, 0, 3, probs=[0.75, "0.25"]))
    with pytest.raises(TraceError, match=error_pattern(path, "gating_probs", None, "numbers", 'a string "0.25"', line=4)):
        load_mixtral_jsonl(path)


def test_mixtral_duplicate_row(tmp_path: Path) -> None:
    path = write_with_bad_line(tmp_path / "routing.jsonl", mixtral_row(0, 0, 1, experts=[0, 7]))
    expected = "one row per (problem_id, layer, token_idx) = (0, 0, 1)"
    with pytest.raises(TraceError, match=error_pattern(path, "row", None, expected, "a second row after line 2", line=4)):
        load_mixtral_jsonl(path)


def test_mixtral_second_dataset(tmp_path: Path) -> None:
    path = write_with_bad_line(tmp_path / "routing.jsonl", {**mixtral_row(0, 0, 3), "dataset": "gsm8k"})
    expected = "'humaneval' (the dataset of line 1)"
    with pytest.raises(TraceError, match=error_pattern(path, "dataset", None, expected, "'gsm8k'", line=4)):
        load_mixtral_jsonl(path)


def test_mixtral_invalid_utf8(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "routing.jsonl", complete_rows({0: 1}, num_layers=1))
    path.write_bytes(path.read_bytes() + b'{"dataset": "\xff"}\n')
    with pytest.raises(TraceError, match=error_pattern(path, "row", None, "UTF-8 text", "invalid byte at column 14", line=2)):
        load_mixtral_jsonl(path)


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_mixtral_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "routing.jsonl"
    path.write_text(content)
    expected = "at least one JSON object (one routing row per line)"
    with pytest.raises(TraceError, match=error_pattern(path, "row", None, expected, "an empty file")):
        load_mixtral_jsonl(path)


def test_mixtral_directory(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=re.escape(f"{tmp_path}: is a directory")):
        load_mixtral_jsonl(tmp_path)


def test_mixtral_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "absent.jsonl"
    with pytest.raises(TraceError, match=re.escape(f"{path}: file not found")):
        load_mixtral_jsonl(path)


# Format detection -----------------------------------------------------------------------------------


def small_trace() -> Trace:
    metadata = TraceMetadata(model="tiny", num_layers=2, num_experts=4, top_k=1, source="test")
    return make_trace(np.array([[[0], [1]], [[2], [3]]]), metadata)


def test_load_any_canonical_npz(tmp_path: Path) -> None:
    path = tmp_path / "trace.npz"
    save_trace(small_trace(), path)
    trace = load_any(str(path))
    assert trace.metadata.model == "tiny"
    assert trace.expert_ids[:, :, 0].tolist() == [[0, 1], [2, 3]]


def test_load_any_flame_npz(tmp_path: Path) -> None:
    path = write_flame(tmp_path / "sample.bin")
    trace = load_any(str(path))
    assert trace.metadata.model == "flame-moe-290m"
    assert trace.num_passes == 5


def test_load_any_flame_npz_without_probs(tmp_path: Path) -> None:
    path = write_flame(tmp_path / "sample.npz", probs=None)
    with pytest.raises(TraceError, match=re.escape(f"{path}: field 'probs': expected the keys ")):
        load_any(str(path))


def test_load_any_mixtral_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "routing.txt"
    path.write_text("\n  " + "\n".join(json.dumps(row) for row in complete_rows({0: 2})))
    trace = load_any(path)
    assert trace.metadata.model == "mixtral-8x7b-instruct"
    assert trace.num_passes == 2


def test_load_any_real_files(flame_npz: Path, mixtral_jsonl: Path) -> None:
    assert load_any(str(flame_npz)).top_k == 6
    assert load_any(str(mixtral_jsonl)).top_k == 2


def test_load_any_unknown_text(tmp_path: Path) -> None:
    path = tmp_path / "notes.csv"
    path.write_text("layer,expert\n0,1\n")
    with pytest.raises(TraceError, match=re.escape(f"{path}: unrecognized file format (first non-blank byte b'l'). Accepted inputs: ")) as info:
        load_any(str(path))
    message = str(info.value)
    assert "a specmd-jax trace .npz" in message
    assert "a FLAME-MoE routing .npz" in message
    assert "a Mixtral routing JSONL file" in message
    assert "'synthetic:...' spec" in message


def test_load_any_unknown_npz(tmp_path: Path) -> None:
    path = tmp_path / "other.npz"
    np.savez(path, weights=np.zeros(3))
    with pytest.raises(TraceError, match=re.escape(f"{path}: unrecognized .npz archive with members ['weights']. Accepted inputs: ")):
        load_any(str(path))


def test_load_any_single_npy(tmp_path: Path) -> None:
    path = tmp_path / "ids.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(TraceError, match=re.escape(f"{path}: unrecognized file format (first non-blank byte b'\\x93')")):
        load_any(str(path))


def test_load_any_truncated_npz(tmp_path: Path) -> None:
    path = tmp_path / "trace.npz"
    save_trace(small_trace(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match=re.escape(f"{path}: truncated or corrupt .npz archive")):
        load_any(str(path))


@pytest.mark.parametrize("content", [b"", b" \n\t\n"])
def test_load_any_empty_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(TraceError, match=re.escape(f"{path}: empty file. Accepted inputs: ")):
        load_any(str(path))


def test_load_any_directory(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=re.escape(f"{tmp_path}: is a directory. Accepted inputs: ")):
        load_any(str(tmp_path))


def test_load_any_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "absent.npz"
    with pytest.raises(TraceError, match=re.escape(f"{path}: file not found. Accepted inputs: ")):
        load_any(str(path))


def test_load_any_synthetic_spec_delegates(monkeypatch: pytest.MonkeyPatch) -> None:
    requested: list[str] = []

    def fake_load_synthetic(spec: str) -> Trace:
        requested.append(spec)
        return small_trace()

    module = types.ModuleType("specmd_jax.traces.synthetic")
    module.load_synthetic = fake_load_synthetic
    monkeypatch.setitem(sys.modules, "specmd_jax.traces.synthetic", module)
    trace = load_any("synthetic:zipf,layers=2")
    assert requested == ["synthetic:zipf,layers=2"]
    assert trace.metadata.model == "tiny"


def test_load_any_canonical_matches_load_trace(tmp_path: Path) -> None:
    path = tmp_path / "trace.npz"
    save_trace(small_trace(), path)
    direct = load_trace(path)
    detected = load_any(str(path))
    assert np.array_equal(direct.expert_ids, detected.expert_ids)
    assert direct.metadata == detected.metadata

"""Tests of the canonical `.npz` trace format: exact round trips and rejection of bad files."""

from __future__ import annotations

import dataclasses
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest

from specmd_jax.traces.flame import load_flame_npz
from specmd_jax.traces.mixtral import load_mixtral_jsonl
from specmd_jax.traces.trace import (
    FORMAT_VERSION,
    MISSING_EXPERT,
    PASS_DECODE,
    PASS_PREFILL,
    Trace,
    TraceError,
    TraceMetadata,
    load_trace,
    make_trace,
    save_trace,
)

ARRAY_FIELDS = ("expert_ids", "missing", "pass_offsets", "pass_kind", "pass_sequence", "scores", "router_logits")


def assert_identical(expected: Trace, actual: Trace) -> None:
    """Check every array bit for bit (NaN payloads included) and the metadata."""
    for field in ARRAY_FIELDS:
        want, got = getattr(expected, field), getattr(actual, field)
        if want is None:
            assert got is None, field
            continue
        assert got.dtype == want.dtype, field
        assert got.shape == want.shape, field
        assert np.array_equal(got, want, equal_nan=want.dtype.kind == "f"), field
        assert got.tobytes() == want.tobytes(), field
    assert actual.metadata == expected.metadata


def mixed_trace() -> Trace:
    """Two sequences with a prefill pass each, decode passes, missing cells, scores and logits."""
    rng = np.random.default_rng(7)
    num_tokens, num_layers, num_experts, top_k = 9, 3, 6, 2
    expert_ids = np.stack(
        [np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(num_layers)]) for _ in range(num_tokens)]
    )

    missing = np.zeros((num_tokens, num_layers), dtype=bool)
    missing[4, 1] = True
    missing[7] = True
    expert_ids[missing] = MISSING_EXPERT
    scores = rng.random((num_tokens, num_layers, top_k)).astype(np.float32)
    scores[missing] = np.nan
    logits = rng.normal(size=(num_tokens, num_layers, num_experts)).astype(np.float32)
    logits[missing] = np.nan

    metadata = TraceMetadata(
        model="mixed",
        num_layers=num_layers,
        num_experts=num_experts,
        top_k=top_k,
        source="generated in test",
        layer_ids=(1, 3, 5),
        notes="prefill and decode",
    )
    return make_trace(
        expert_ids,
        metadata,
        missing=missing,
        pass_offsets=np.array([0, 3, 4, 5, 7, 8, 9]),
        pass_kind=np.array([PASS_PREFILL, PASS_DECODE, PASS_DECODE, PASS_PREFILL, PASS_DECODE, PASS_DECODE]),
        pass_sequence=np.array([0, 0, 0, 1, 1, 1]),
        scores=scores,
        router_logits=logits,
    )


def small_trace() -> Trace:
    metadata = TraceMetadata(model="tiny", num_layers=2, num_experts=4, top_k=1, source="test")
    return make_trace(np.array([[[0], [1]], [[2], [3]]]), metadata)


def rewrite_members(path: Path, **changes: np.ndarray | None) -> None:
    """Rewrite a saved trace with some members replaced, where a change of None removes that member."""
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    for name, value in changes.items():
        if value is None:
            del arrays[name]
        else:
            arrays[name] = value
    with open(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def corrupt_member(path: Path, member: str) -> None:
    """Overwrite the first byte of a compressed member with an invalid deflate block type."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    data = bytearray(path.read_bytes())
    name_length = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_length = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    data[info.header_offset + 30 + name_length + extra_length] = 0xFF
    path.write_bytes(bytes(data))


# Round trips ----------------------------------------------------------------------------------------


def test_round_trip_flame(tmp_path: Path, flame_npz: Path) -> None:
    trace = load_flame_npz(flame_npz)
    path = tmp_path / "flame.npz"
    save_trace(trace, path)
    assert_identical(trace, load_trace(path))


def test_round_trip_mixtral(tmp_path: Path, mixtral_jsonl: Path) -> None:
    trace = load_mixtral_jsonl(mixtral_jsonl)
    path = tmp_path / "mixtral.npz"
    save_trace(trace, path)
    loaded = load_trace(path)
    assert_identical(trace, loaded)
    assert loaded.num_missing_cells == 37


def test_round_trip_mixed_passes(tmp_path: Path) -> None:
    trace = mixed_trace()
    path = tmp_path / "mixed.npz"
    save_trace(trace, path)
    loaded = load_trace(path)
    assert_identical(trace, loaded)
    assert loaded.num_passes == 6
    assert loaded.metadata.layer_ids == (1, 3, 5)


def test_round_trip_without_scores(tmp_path: Path) -> None:
    trace = small_trace()
    path = tmp_path / "tiny.npz"
    save_trace(trace, path)
    loaded = load_trace(path)
    assert loaded.scores is None
    assert loaded.router_logits is None
    assert_identical(trace, loaded)


def test_saved_file_members(tmp_path: Path) -> None:
    path = tmp_path / "mixed.npz"
    save_trace(mixed_trace(), path)
    with np.load(path) as archive:
        assert int(archive["format_version"]) == FORMAT_VERSION
        assert json.loads(str(archive["metadata"]))["model"] == "mixed"
        assert sorted(archive.files) == sorted([*ARRAY_FIELDS, "format_version", "metadata"])


def test_save_keeps_given_name(tmp_path: Path) -> None:
    path = tmp_path / "trace.bin"
    save_trace(small_trace(), path)
    assert path.exists()
    assert load_trace(path).metadata.model == "tiny"


# Rejected files -------------------------------------------------------------------------------------


def test_load_unknown_version(tmp_path: Path) -> None:
    path = tmp_path / "trace.npz"
    save_trace(small_trace(), path)
    rewrite_members(path, format_version=np.asarray(99, dtype=np.int32))
    with pytest.raises(TraceError, match=re.escape(f"{path}: field 'format_version': expected version {FORMAT_VERSION}, got version 99")):
        load_trace(path)


def test_load_without_version(tmp_path: Path) -> None:
    path = tmp_path / "trace.npz"
    save_trace(small_trace(), path)
    rewrite_members(path, format_version=None)
    pattern = re.escape(f"{path}: field 'format_version': expected version {FORMAT_VERSION}, got no such key")
    with pytest.raises(TraceError, match=pattern):
        load_trace(path)


@pytest.mark.parametrize("member", ["expert_ids", "missing", "pass_offsets", "pass_kind", "pass_sequence", "metadata"])
def test_load_missing_member(tmp_path: Path, member: str) -> None:
    path = tmp_path / "trace.npz"
    save_trace(small_trace(), path)
    rewrite_members(path, **{member: None})
    with pytest.raises(TraceError, match=re.escape(f"{path}: field '{member}': expected a stored array, got no such key")):
        load_trace(path)


def test_load_invalid_metadata_json(tmp_path: Path) -> None:
    path = tmp_path / "trace.npz"
    save_trace(small_trace(), path)
    rewrite_members(path, metadata=np.asarray("{model: tiny"))
    with pytest.raises(TraceError, match=re.escape(f"{path}: field 'metadata': expected a JSON object, got invalid JSON")):
        load_trace(path)


def test_load_metadata_missing_key(tmp_path: Path) -> None:
    path = tmp_path / "trace.npz"
    save_trace(small_trace(), path)
    raw = json.loads(small_trace().metadata.to_json())
    del raw["top_k"]
    rewrite_members(path, metadata=np.asarray(json.dumps(raw)))
    with pytest.raises(TraceError, match=re.escape(f"{path}: field 'metadata': expected keys ")) as info:
        load_trace(path)
    assert "got missing ['top_k']" in str(info.value)


def test_load_invalid_content(tmp_path: Path) -> None:
    path = tmp_path / "trace.npz"
    save_trace(small_trace(), path)
    rewrite_members(path, expert_ids=np.array([[[0], [1]], [[2], [4]]], dtype=np.int16))
    with pytest.raises(TraceError, match=re.escape(f"{path}: field 'expert_ids' at index (1, 1, 0): expected an expert id in [0, 4), got 4")):
        load_trace(path)


def test_load_truncated_npz(tmp_path: Path) -> None:
    path = tmp_path / "trace.npz"
    save_trace(mixed_trace(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match=re.escape(f"{path}: truncated or corrupt .npz archive")):
        load_trace(path)


def test_load_text_file(tmp_path: Path) -> None:
    path = tmp_path / "trace.npz"
    path.write_text('{"model": "tiny"}\n')
    with pytest.raises(TraceError, match=re.escape(f"{path}: not an .npz archive (the file does not start with a zip header")):
        load_trace(path)


def test_load_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "trace.npz"
    path.write_bytes(b"")
    with pytest.raises(TraceError, match=re.escape(f"{path}: empty file, expected a specmd-jax trace .npz archive")):
        load_trace(path)


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=re.escape(f"{tmp_path}: is a directory, expected a specmd-jax trace .npz file")):
        load_trace(tmp_path)


def test_load_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "absent.npz"
    with pytest.raises(TraceError, match=re.escape(f"{path}: file not found")):
        load_trace(path)


def test_load_single_npy(tmp_path: Path) -> None:
    path = tmp_path / "trace.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(TraceError, match=re.escape(f"{path}: not an .npz archive (the file does not start with a zip header")):
        load_trace(path)


def test_load_flame_file_as_canonical(flame_npz: Path) -> None:
    pattern = re.escape(f"{flame_npz}: field 'format_version': expected version {FORMAT_VERSION}, got no such key")
    with pytest.raises(TraceError, match=pattern):
        load_trace(flame_npz)


def test_load_corrupt_member(tmp_path: Path) -> None:
    path = tmp_path / "trace.npz"
    save_trace(mixed_trace(), path)
    corrupt_member(path, "expert_ids.npy")
    with pytest.raises(TraceError, match=re.escape(f"{path}: truncated or corrupt .npz member")):
        load_trace(path)


def test_load_metadata_layer_ids_not_list(tmp_path: Path) -> None:
    path = tmp_path / "trace.npz"
    save_trace(small_trace(), path)
    raw = json.loads(small_trace().metadata.to_json())
    raw["layer_ids"] = 5
    rewrite_members(path, metadata=np.asarray(json.dumps(raw)))
    with pytest.raises(TraceError, match=re.escape(f"{path}: field 'metadata")):
        load_trace(path)


def _speculative_trace(speculative: np.ndarray):
    ids = np.array([[[0, 1], [2, 3]], [[1, 2], [0, 3]]])
    return make_trace(ids, TraceMetadata("tiny", 2, 4, 2, "test"), speculative_logits=speculative)


def test_speculative_logits_round_trip(tmp_path: Path) -> None:
    speculative = np.full((2, 2, 4), np.nan, np.float32)
    speculative[:, 0] = np.arange(8, dtype=np.float32).reshape(2, 4)
    path = tmp_path / "trace.npz"
    save_trace(_speculative_trace(speculative), path)
    np.testing.assert_array_equal(load_trace(path).speculative_logits, speculative)


def test_speculative_logits_last_layer_not_nan() -> None:
    speculative = np.zeros((2, 2, 4), np.float32)
    with pytest.raises(TraceError, match=re.escape("field 'speculative_logits' at index (0, 1, 0): expected NaN for the last MoE layer")):
        _speculative_trace(speculative)


def test_speculative_logits_wrong_shape() -> None:
    with pytest.raises(TraceError, match=re.escape("field 'speculative_logits': expected shape (2, 2, 4), got shape (2, 2, 3)")):
        _speculative_trace(np.zeros((2, 2, 3), np.float32))


def test_speculative_logits_nan_in_present_cell() -> None:
    speculative = np.full((2, 2, 4), np.nan, np.float32)
    speculative[:, 0] = 1.0
    speculative[1, 0, 2] = np.nan
    with pytest.raises(TraceError, match=re.escape("field 'speculative_logits' at index (1, 0, 2): expected a finite logit, got nan")):
        _speculative_trace(speculative)


# Metadata types ---------------------------------------------------------------------------------------


def write_metadata(path: Path, **changes: object) -> Path:
    """Save `small_trace()` with some metadata values replaced in the stored JSON."""
    save_trace(small_trace(), path)
    raw = json.loads(small_trace().metadata.to_json())
    raw.update(changes)
    rewrite_members(path, metadata=np.asarray(json.dumps(raw)))
    return path


@pytest.mark.parametrize(
    ("field", "value", "expected", "actual"),
    [
        ("synthetic", "no", "true or false", '"no"'),
        ("synthetic", 0, "true or false", "0"),
        ("num_experts", True, "an integer", "true"),
        ("num_layers", "2", "an integer", '"2"'),
        ("top_k", 1.0, "an integer", "1.0"),
        ("model", 7, "a string", "7"),
        ("source", None, "a string", "null"),
        ("notes", ["a"], "a string", '["a"]'),
        ("layer_ids", [0, True], "a list of integers or null", "[0, true]"),
    ],
)
def test_load_metadata_wrong_type(tmp_path: Path, field: str, value: object, expected: str, actual: str) -> None:
    path = write_metadata(tmp_path / "trace.npz", **{field: value})
    message = f"{path}: field 'metadata.{field}': expected {expected}, got {actual}"
    with pytest.raises(TraceError, match=re.escape(message)):
        load_trace(path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"synthetic": "no"}, "field 'metadata.synthetic': expected True or False, got 'no'"),
        ({"num_experts": True}, "field 'metadata.num_experts': expected a positive integer, got True"),
        ({"model": None}, "field 'metadata.model': expected a string, got None"),
    ],
)
def test_make_trace_metadata_wrong_type(changes: dict, message: str) -> None:
    metadata = dataclasses.replace(small_trace().metadata, **changes)
    with pytest.raises(TraceError, match=re.escape(f"<trace>: {message}")):
        make_trace(np.array([[[0], [1]], [[2], [3]]]), metadata)


# Pass sequences -----------------------------------------------------------------------------------------


def sequence_trace(pass_sequence: list[int]) -> Trace:
    """One decode token per pass, with the given sequence ids."""
    num_passes = len(pass_sequence)
    expert_ids = np.zeros((num_passes, 2, 1), dtype=np.int16)
    metadata = TraceMetadata(model="tiny", num_layers=2, num_experts=4, top_k=1, source="test")
    return make_trace(expert_ids, metadata, pass_sequence=np.array(pass_sequence))


def test_pass_sequence_negative() -> None:
    message = "<trace>: field 'pass_sequence' at index 0: expected a sequence id >= 0, got -5"
    with pytest.raises(TraceError, match=re.escape(message)):
        sequence_trace([-5, -5, -5])


@pytest.mark.parametrize(
    ("pass_sequence", "index", "sequence", "end"),
    [
        ([0, 1, 0], 2, 0, 0),
        ([0, 0, 1, 1, 2, 0], 5, 0, 1),
        ([3, 3, 1, 2, 1], 4, 1, 2),
    ],
)
def test_pass_sequence_not_contiguous(pass_sequence: list[int], index: int, sequence: int, end: int) -> None:
    expected = f"a sequence id not used before (the passes of one sequence must be contiguous, and sequence {sequence} ended at pass {end})"
    message = f"<trace>: field 'pass_sequence' at index {index}: expected {expected}, got {sequence}"
    with pytest.raises(TraceError, match=re.escape(message)):
        sequence_trace(pass_sequence)


@pytest.mark.parametrize("pass_sequence", [[0, 0, 1, 1], [1, 1, 0, 0], [2, 5, 5, 9], [7]])
def test_pass_sequence_contiguous_accepted(pass_sequence: list[int]) -> None:
    # Ids are labels: gaps and descending order are valid as long as each sequence is contiguous.
    assert sequence_trace(pass_sequence).pass_sequence.tolist() == pass_sequence


def test_load_pass_sequence_not_contiguous(tmp_path: Path) -> None:
    path = tmp_path / "trace.npz"
    save_trace(mixed_trace(), path)
    rewrite_members(path, pass_sequence=np.array([0, 0, 1, 1, 0, 0], dtype=np.int32))
    with pytest.raises(TraceError, match=re.escape(f"{path}: field 'pass_sequence' at index 4: expected a sequence id not used before")):
        load_trace(path)


def test_real_files_have_contiguous_sequences(flame_npz: Path, mixtral_jsonl: Path) -> None:
    for trace in (load_flame_npz(flame_npz), load_mixtral_jsonl(mixtral_jsonl)):
        starts = np.flatnonzero(np.diff(trace.pass_sequence)) + 1
        run_ids = trace.pass_sequence[np.concatenate(([0], starts))]
        assert len(np.unique(run_ids)) == len(run_ids)
        assert trace.pass_sequence.min() >= 0

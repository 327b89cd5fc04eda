"""Loader for Mixtral decode-time routing logs stored as JSON Lines.

Each line is one routing decision of one (problem, layer, decode token):

  {"dataset": "humaneval", "problem_id": 0, "layer": 0, "experts": [6, 5],
   "gating_probs": [0.69, 0.30], "token_idx": 0}

Every problem is a separate sequence, and `token_idx` numbers its decode passes from 0. The trace stores
the problems in ascending `problem_id` (stored as `pass_sequence`), and each problem's passes in
ascending `token_idx`. A problem has max(token_idx) + 1 passes. A (problem, layer, token) with no row
becomes a missing cell, and so does every cell of a token index that has no row in any layer.
`gating_probs` become `Trace.scores`.

The trace has the model's layer count (32 MoE layers for Mixtral-8x7B), so layers without rows are
missing cells too, unless the caller asks to infer the count from the largest `layer` in the file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any

import numpy as np

from specmd_jax.traces.trace import (
    MISSING_EXPERT,
    PASS_DECODE,
    Trace,
    TraceError,
    TraceMetadata,
    make_trace,
    trace_error,
)

logger = logging.getLogger(__name__)

MIXTRAL_MODEL = "mixtral-8x7b-instruct"
MIXTRAL_NUM_LAYERS = 32  # MoE layers of Mixtral-8x7B (every decoder layer is an MoE layer)
MIXTRAL_NUM_EXPERTS = 8
MIXTRAL_TOP_K = 2

# A trace may have at most this many (pass, layer) cells per row of the file. The real HumanEval file
# has 10,816 cells for 10,779 rows, and a file with rows for one layer of 32 has 32 cells per row.
# A token index or layer far beyond the rows present would create mostly missing cells, and a stray
# value such as 2**31 - 1 would allocate hundreds of GB, so such a file is rejected before allocating.
MAX_CELLS_PER_ROW = 64

ROW_KEYS = ("dataset", "problem_id", "layer", "experts", "gating_probs", "token_idx")

_INT32_MAX = int(np.iinfo(np.int32).max)
_INT16_MAX = int(np.iinfo(np.int16).max)


@dataclasses.dataclass
class _Rows:
    """Validated rows, with one list entry per non-blank line."""

    num_layers: int | None
    num_experts: int
    dataset: str | None = None
    dataset_line: int = 0
    problem: list[int] = dataclasses.field(default_factory=list)
    layer: list[int] = dataclasses.field(default_factory=list)
    token: list[int] = dataclasses.field(default_factory=list)
    experts: list[list[int]] = dataclasses.field(default_factory=list)
    probs: list[list[float]] = dataclasses.field(default_factory=list)
    line: list[int] = dataclasses.field(default_factory=list)
    line_of_key: dict[tuple[int, int, int], int] = dataclasses.field(default_factory=dict)


def load_mixtral_jsonl(
    path: str | os.PathLike, *, num_layers: int | None = MIXTRAL_NUM_LAYERS, num_experts: int = MIXTRAL_NUM_EXPERTS
) -> Trace:
    """Read a Mixtral routing JSONL file into a validated `Trace`.

    `num_layers` is the model's MoE layer count, which the trace gets even where the file has no rows
    for the last layers. None infers it as the largest `layer` + 1. `num_experts` bounds the expert ids.

    Raises `TraceError` naming the file, the 1-based line number as "line N", the JSON key, and the
    expected and actual value, for: a line that is not a JSON object, a key given twice, a missing or
    unknown key, a `problem_id`, `layer` or `token_idx` that is not an integer >= 0, a `layer` >=
    `num_layers`, `experts` or `gating_probs` that are not lists of 2 entries, an expert id outside
    [0, num_experts), repeated experts in one row, a gating probability that is NaN, infinite or
    outside [0, 1], a second `dataset` name, a second row for the same (problem_id, layer, token_idx),
    and a `token_idx` or inferred layer count that would give more than `MAX_CELLS_PER_ROW` (pass,
    layer) cells per row. Blank lines are skipped. Raises ValueError for invalid arguments.

    The number of missing cells is logged as a warning and available as `trace.num_missing_cells`.
    """
    _check_arguments(num_layers, num_experts)
    origin = str(path)
    rows = _read_rows(path, origin, _Rows(num_layers=num_layers, num_experts=num_experts))
    trace = _build_trace(rows, origin)

    if trace.num_missing_cells:
        empty_passes = int(trace.missing.all(axis=1).sum())
        logger.warning(
            "%s: %d of %d (pass, layer) cells have no routing row and are marked missing, and %d passes have no row in any layer",
            origin,
            trace.num_missing_cells,
            trace.missing.size,
            empty_passes,
        )
    return trace


def _check_arguments(num_layers: int | None, num_experts: int) -> None:
    if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1):
        raise ValueError(f"num_layers: expected a positive integer or None, got {num_layers!r}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or not MIXTRAL_TOP_K <= num_experts <= _INT16_MAX:
        raise ValueError(f"num_experts: expected an integer in [{MIXTRAL_TOP_K}, {_INT16_MAX}] (int16 expert ids), got {num_experts!r}")


def _read_rows(path: str | os.PathLike, origin: str, rows: _Rows) -> _Rows:
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise TraceError(f"{origin}: file not found") from None
    except IsADirectoryError:
        raise TraceError(f"{origin}: is a directory, expected a Mixtral routing JSONL file") from None
    except OSError as error:
        raise TraceError(f"{origin}: cannot read the file ({error})") from None

    with handle:
        for line_number, raw_line in enumerate(handle, start=1):
            if not raw_line.strip():
                continue
            _add_row(rows, _parse_line(raw_line, origin, line_number), origin, line_number)
    if not rows.problem:
        raise trace_error(origin, "row", None, "at least one JSON object (one routing row per line)", "an empty file")
    return rows


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return f"{name} {json.dumps(value)[:60]}" if kind is not type(None) else name
    return f"a number {value!r}"


class _DuplicateKeyError(Exception):
    def __init__(self, key: str, values: list[Any]) -> None:
        super().__init__(key)
        self.key = key
        self.values = values


def _object_without_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Build a JSON object, raising `_DuplicateKeyError` where json.loads would keep only the last value."""
    row: dict[str, Any] = {}
    for key, value in pairs:
        if key in row:
            raise _DuplicateKeyError(key, [other for name, other in pairs if name == key])
        row[key] = value
    return row


def _parse_line(raw_line: bytes, origin: str, line_number: int) -> dict[str, Any]:
    try:
        text = raw_line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise trace_error(origin, "row", None, "UTF-8 text", f"invalid byte at column {error.start + 1}", line=line_number) from None
    # Without its line break, a line cut off mid-object fails at its own end, not at column 1 of a
    # second line that the decoder would otherwise see.
    text = text.removesuffix("\n").removesuffix("\r")
    try:
        row = json.loads(text, object_pairs_hook=_object_without_duplicate_keys)
    except json.JSONDecodeError as error:
        # Some decoder messages end in "at" because json appends the position itself.
        message = error.msg.removesuffix(" at")
        raise trace_error(origin, "row", None, "a JSON object", f"invalid JSON ({message} at column {error.colno})", line=line_number) from None
    except _DuplicateKeyError as error:
        values = ", ".join(json.dumps(value) for value in error.values)
        raise trace_error(origin, error.key, None, "each key once per row", f"{len(error.values)} values ({values})", line=line_number) from None
    if not isinstance(row, dict):
        raise trace_error(origin, "row", None, "a JSON object", _json_type(row), line=line_number)

    absent = [key for key in ROW_KEYS if key not in row]
    if absent:
        raise trace_error(origin, absent[0], None, f"the keys {list(ROW_KEYS)}", f"no such key (the row has {sorted(row)})", line=line_number)
    unknown = sorted(key for key in row if key not in ROW_KEYS)
    if unknown:
        raise trace_error(origin, unknown[0], None, f"only the keys {list(ROW_KEYS)}", f"unknown keys {unknown}", line=line_number)
    return row


def _require_index(row: dict[str, Any], key: str, origin: str, line: int) -> int:
    """Return `row[key]` if it is a JSON integer in [0, 2**31 - 1] (it must fit the int32 arrays)."""
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise trace_error(origin, key, None, "an integer", _json_type(value), line=line)
    if not 0 <= value <= _INT32_MAX:
        raise trace_error(origin, key, None, f"an integer in [0, {_INT32_MAX}]", value, line=line)
    return value


def _require_list(row: dict[str, Any], key: str, origin: str, line: int) -> list[Any]:
    value = row[key]
    if not isinstance(value, list):
        raise trace_error(origin, key, None, f"an array of {MIXTRAL_TOP_K} entries", _json_type(value), line=line)
    if len(value) != MIXTRAL_TOP_K:
        expected = f"{MIXTRAL_TOP_K} entries (Mixtral routes each token to its top {MIXTRAL_TOP_K})"
        raise trace_error(origin, key, None, expected, f"{len(value)} entries {value}", line=line)
    return value


def _check_experts(row: dict[str, Any], num_experts: int, origin: str, line: int) -> list[int]:
    experts = _require_list(row, "experts", origin, line)
    for expert in experts:
        if isinstance(expert, bool) or not isinstance(expert, int):
            raise trace_error(origin, "experts", None, "integer expert ids", _json_type(expert), line=line)
        if not 0 <= expert < num_experts:
            raise trace_error(origin, "experts", None, f"an expert id in [0, {num_experts})", expert, line=line)
    if len(set(experts)) != len(experts):
        raise trace_error(origin, "experts", None, "distinct experts within one top-k", experts, line=line)
    return experts


def _check_probs(row: dict[str, Any], origin: str, line: int) -> list[float]:
    probs = _require_list(row, "gating_probs", origin, line)
    for prob in probs:
        if isinstance(prob, bool) or not isinstance(prob, (int, float)):
            raise trace_error(origin, "gating_probs", None, "numbers", _json_type(prob), line=line)
        # Python's json module accepts the non-standard NaN and Infinity literals, so both are checked.
        if not (math.isfinite(prob) and 0 <= prob <= 1):
            raise trace_error(origin, "gating_probs", None, "a finite probability in [0, 1]", prob, line=line)
    return [float(prob) for prob in probs]


def _add_row(rows: _Rows, row: dict[str, Any], origin: str, line: int) -> None:
    dataset = row["dataset"]
    if not isinstance(dataset, str) or not dataset:
        raise trace_error(origin, "dataset", None, "a non-empty string", _json_type(dataset), line=line)
    if rows.dataset is None:
        rows.dataset, rows.dataset_line = dataset, line
    elif dataset != rows.dataset:
        # Problem ids restart in every dataset, so two datasets in one file would collide.
        expected = f"{rows.dataset!r} (the dataset of line {rows.dataset_line})"
        raise trace_error(origin, "dataset", None, expected, repr(dataset), line=line)

    problem = _require_index(row, "problem_id", origin, line)
    layer = _require_index(row, "layer", origin, line)
    if rows.num_layers is not None and layer >= rows.num_layers:
        expected = f"a layer id in [0, {rows.num_layers}) (the model's MoE layer count; pass num_layers=None to infer it)"
        raise trace_error(origin, "layer", None, expected, layer, line=line)
    token = _require_index(row, "token_idx", origin, line)
    experts = _check_experts(row, rows.num_experts, origin, line)
    probs = _check_probs(row, origin, line)

    key = (problem, layer, token)
    first_line = rows.line_of_key.get(key)
    if first_line is not None:
        expected = f"one row per (problem_id, layer, token_idx) = {key}"
        raise trace_error(origin, "row", None, expected, f"a second row after line {first_line}", line=line)
    rows.line_of_key[key] = line
    rows.problem.append(problem)
    rows.layer.append(layer)
    rows.token.append(token)
    rows.experts.append(experts)
    rows.probs.append(probs)
    rows.line.append(line)


def _check_cell_count(rows: _Rows, origin: str, num_passes: int, num_layers: int) -> None:
    """Raise `TraceError` before allocating when the trace would exceed `MAX_CELLS_PER_ROW` cells per row.

    The error names the row with the largest `token_idx`, unless the layer count is inferred and the
    layers outnumber the distinct layer ids by more than the passes outnumber the (problem_id,
    token_idx) pairs with a row. Then it names the row with the largest `layer`.
    """
    num_rows = len(rows.problem)
    num_cells = num_passes * num_layers
    limit = MAX_CELLS_PER_ROW * num_rows
    if num_cells <= limit:
        return

    layer = np.asarray(rows.layer, dtype=np.int64)
    pairs = np.unique(np.stack([np.asarray(rows.problem, dtype=np.int64), np.asarray(rows.token, dtype=np.int64)]), axis=1)
    token_sparsity = num_passes / pairs.shape[1]
    layer_sparsity = num_layers / np.unique(layer).size
    if rows.num_layers is None and layer_sparsity > token_sparsity:
        field, values = "layer", layer
    else:
        field, values = "token_idx", np.asarray(rows.token, dtype=np.int64)
    row = int(np.argmax(values))
    expected = (
        f"at most {MAX_CELLS_PER_ROW} (pass, layer) cells per row of the file ({limit} cells for {num_rows} rows), "
        "because a value far beyond the rows present would create mostly missing cells"
    )
    actual = f"{int(values[row])}, which makes {num_passes} passes x {num_layers} layers = {num_cells} cells"
    raise trace_error(origin, field, None, expected, actual, line=rows.line[row])


def _build_trace(rows: _Rows, origin: str) -> Trace:
    """Place every row at (pass, layer); cells without a row stay missing."""
    problem = np.asarray(rows.problem, dtype=np.int64)
    layer = np.asarray(rows.layer, dtype=np.int64)
    token = np.asarray(rows.token, dtype=np.int64)
    num_layers = rows.num_layers if rows.num_layers is not None else int(layer.max()) + 1

    # Each problem is one sequence of max(token_idx) + 1 decode passes, in ascending problem id.
    problem_ids, problem_index = np.unique(problem, return_inverse=True)
    passes_per_problem = np.zeros(len(problem_ids), dtype=np.int64)
    np.maximum.at(passes_per_problem, problem_index, token + 1)
    first_pass = np.concatenate(([0], np.cumsum(passes_per_problem)[:-1]))
    num_passes = int(passes_per_problem.sum())
    _check_cell_count(rows, origin, num_passes, num_layers)
    pass_index = first_pass[problem_index] + token

    expert_ids = np.full((num_passes, num_layers, MIXTRAL_TOP_K), MISSING_EXPERT, dtype=np.int16)
    scores = np.full((num_passes, num_layers, MIXTRAL_TOP_K), np.nan, dtype=np.float32)
    missing = np.ones((num_passes, num_layers), dtype=bool)
    expert_ids[pass_index, layer] = np.asarray(rows.experts, dtype=np.int16)
    scores[pass_index, layer] = np.asarray(rows.probs, dtype=np.float32)
    missing[pass_index, layer] = False

    num_missing = int(missing.sum())
    metadata = TraceMetadata(
        model=MIXTRAL_MODEL,
        num_layers=num_layers,
        num_experts=rows.num_experts,
        top_k=MIXTRAL_TOP_K,
        source=f"{origin} (dataset {rows.dataset})",
        layer_ids=tuple(range(num_layers)),
        notes=(
            f"decode passes only; problems {problem_ids.tolist()} with {passes_per_problem.tolist()} passes; "
            f"{num_missing} (pass, layer) cells missing because the source has no row for them"
        ),
    )
    return make_trace(
        expert_ids,
        metadata,
        missing=missing,
        pass_kind=np.full(num_passes, PASS_DECODE, dtype=np.int8),
        pass_sequence=np.repeat(problem_ids, passes_per_problem).astype(np.int32),
        scores=scores,
        origin=origin,
    )

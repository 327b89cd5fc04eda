"""Loader for Mixtral decode-time routing logs stored as JSON Lines.

Each line is one routing decision of one (problem, layer, decode token):

  {"dataset": "humaneval", "problem_id": 0, "layer": 0, "experts": [6, 5],
   "gating_probs": [0.69, 0.30], "token_idx": 0}

Every problem is a separate sequence, and `token_idx` numbers its decode passes from 0. The trace stores
the problems in ascending `problem_id` (stored as `pass_sequence`), and each problem's passes in
ascending `token_idx`. A problem has max(token_idx) + 1 passes. A (problem, layer, token) with no row
becomes a missing cell, and so does every cell of a token index that has no row in any layer.
`gating_probs` become `Trace.scores`.
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
MIXTRAL_NUM_EXPERTS = 8
MIXTRAL_TOP_K = 2

ROW_KEYS = ("dataset", "problem_id", "layer", "experts", "gating_probs", "token_idx")

_INT32_MAX = int(np.iinfo(np.int32).max)


@dataclasses.dataclass
class _Rows:
    """Validated rows, with one list entry per non-blank line."""

    dataset: str | None = None
    dataset_line: int = 0
    problem: list[int] = dataclasses.field(default_factory=list)
    layer: list[int] = dataclasses.field(default_factory=list)
    token: list[int] = dataclasses.field(default_factory=list)
    experts: list[list[int]] = dataclasses.field(default_factory=list)
    probs: list[list[float]] = dataclasses.field(default_factory=list)
    line_of_key: dict[tuple[int, int, int], int] = dataclasses.field(default_factory=dict)


def load_mixtral_jsonl(path: str | os.PathLike) -> Trace:
    """Read a Mixtral routing JSONL file into a validated `Trace`.

    Raises `TraceError` naming the file, the JSON key, the 1-based line number as "line N", and the
    expected and actual value, for: a line that is not a JSON object, a missing or unknown key, a
    `problem_id`, `layer` or `token_idx` that is not an integer >= 0, `experts` or `gating_probs` that
    are not lists of 2 entries, an expert id outside [0, 8), repeated experts in one row, a gating
    probability that is NaN, infinite or outside [0, 1], a second `dataset` name, and a second row
    for the same (problem_id, layer, token_idx). Blank lines are skipped.

    The number of missing cells is logged as a warning and available as `trace.num_missing_cells`.
    """
    origin = str(path)
    rows = _read_rows(path, origin)
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


def _read_rows(path: str | os.PathLike, origin: str) -> _Rows:
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise TraceError(f"{origin}: file not found") from None
    except IsADirectoryError:
        raise TraceError(f"{origin}: is a directory, expected a Mixtral routing JSONL file") from None
    except OSError as error:
        raise TraceError(f"{origin}: cannot read the file ({error})") from None

    rows = _Rows()
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


def _parse_line(raw_line: bytes, origin: str, line_number: int) -> dict[str, Any]:
    where = f"line {line_number}"
    try:
        text = raw_line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise trace_error(origin, "row", where, "UTF-8 text", f"invalid byte at column {error.start + 1}") from None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        # A file cut off mid-line fails here, so truncation is reported at the last line.
        raise trace_error(origin, "row", where, "a JSON object", f"invalid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(row, dict):
        raise trace_error(origin, "row", where, "a JSON object", _json_type(row))

    absent = [key for key in ROW_KEYS if key not in row]
    if absent:
        raise trace_error(origin, absent[0], where, f"the keys {list(ROW_KEYS)}", f"no such key (the row has {sorted(row)})")
    unknown = sorted(key for key in row if key not in ROW_KEYS)
    if unknown:
        raise trace_error(origin, unknown[0], where, f"only the keys {list(ROW_KEYS)}", f"unknown keys {unknown}")
    return row


def _require_index(row: dict[str, Any], key: str, origin: str, where: str) -> int:
    """Return `row[key]` if it is a JSON integer in [0, 2**31 - 1] (it must fit the int32 arrays)."""
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise trace_error(origin, key, where, "an integer", _json_type(value))
    if not 0 <= value <= _INT32_MAX:
        raise trace_error(origin, key, where, f"an integer in [0, {_INT32_MAX}]", value)
    return value


def _require_list(row: dict[str, Any], key: str, origin: str, where: str) -> list[Any]:
    value = row[key]
    if not isinstance(value, list):
        raise trace_error(origin, key, where, f"an array of {MIXTRAL_TOP_K} entries", _json_type(value))
    if len(value) != MIXTRAL_TOP_K:
        raise trace_error(origin, key, where, f"{MIXTRAL_TOP_K} entries (Mixtral routes each token to its top {MIXTRAL_TOP_K})", f"{len(value)} entries {value}")
    return value


def _check_experts(row: dict[str, Any], origin: str, where: str) -> list[int]:
    experts = _require_list(row, "experts", origin, where)
    for expert in experts:
        if isinstance(expert, bool) or not isinstance(expert, int):
            raise trace_error(origin, "experts", where, "integer expert ids", _json_type(expert))
        if not 0 <= expert < MIXTRAL_NUM_EXPERTS:
            raise trace_error(origin, "experts", where, f"an expert id in [0, {MIXTRAL_NUM_EXPERTS})", expert)
    if len(set(experts)) != len(experts):
        raise trace_error(origin, "experts", where, "distinct experts within one top-k", experts)
    return experts


def _check_probs(row: dict[str, Any], origin: str, where: str) -> list[float]:
    probs = _require_list(row, "gating_probs", origin, where)
    for prob in probs:
        if isinstance(prob, bool) or not isinstance(prob, (int, float)):
            raise trace_error(origin, "gating_probs", where, "numbers", _json_type(prob))
        # Python's json module accepts the non-standard NaN and Infinity literals, so both are checked.
        if not (math.isfinite(prob) and 0 <= prob <= 1):
            raise trace_error(origin, "gating_probs", where, "a finite probability in [0, 1]", prob)
    return [float(prob) for prob in probs]


def _add_row(rows: _Rows, row: dict[str, Any], origin: str, line_number: int) -> None:
    where = f"line {line_number}"
    dataset = row["dataset"]
    if not isinstance(dataset, str) or not dataset:
        raise trace_error(origin, "dataset", where, "a non-empty string", _json_type(dataset))
    if rows.dataset is None:
        rows.dataset, rows.dataset_line = dataset, line_number
    elif dataset != rows.dataset:
        # Problem ids restart in every dataset, so two datasets in one file would collide.
        raise trace_error(origin, "dataset", where, f"{rows.dataset!r} (the dataset of line {rows.dataset_line})", repr(dataset))

    problem = _require_index(row, "problem_id", origin, where)
    layer = _require_index(row, "layer", origin, where)
    token = _require_index(row, "token_idx", origin, where)
    experts = _check_experts(row, origin, where)
    probs = _check_probs(row, origin, where)

    key = (problem, layer, token)
    first_line = rows.line_of_key.get(key)
    if first_line is not None:
        raise trace_error(
            origin, "row", where, f"one row per (problem_id, layer, token_idx) = {key}", f"a second row after line {first_line}"
        )
    rows.line_of_key[key] = line_number
    rows.problem.append(problem)
    rows.layer.append(layer)
    rows.token.append(token)
    rows.experts.append(experts)
    rows.probs.append(probs)


def _build_trace(rows: _Rows, origin: str) -> Trace:
    """Place every row at (pass, layer); cells without a row stay missing."""
    problem = np.asarray(rows.problem, dtype=np.int64)
    layer = np.asarray(rows.layer, dtype=np.int64)
    token = np.asarray(rows.token, dtype=np.int64)
    num_layers = int(layer.max()) + 1

    # Each problem is one sequence of max(token_idx) + 1 decode passes, in ascending problem id.
    problem_ids, problem_index = np.unique(problem, return_inverse=True)
    passes_per_problem = np.zeros(len(problem_ids), dtype=np.int64)
    np.maximum.at(passes_per_problem, problem_index, token + 1)
    first_pass = np.concatenate(([0], np.cumsum(passes_per_problem)[:-1]))
    num_passes = int(passes_per_problem.sum())
    # NOTE: the arrays grow with the largest token_idx and layer, so one stray huge value can exhaust
    # memory. No upper bound is known for a valid file, so none is checked.
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
        num_experts=MIXTRAL_NUM_EXPERTS,
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

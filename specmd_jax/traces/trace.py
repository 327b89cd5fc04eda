"""The canonical routing trace and its versioned `.npz` file format.

A trace is a sequence of forward passes in execution order. Each pass covers one or more tokens
(a prefill of P tokens, or one decode token) and, for every MoE layer, each token's selected experts.

Axis names used project-wide:
  T  forward passes          N  tokens (all passes together)
  L  MoE layers              E  experts per layer
  K  experts selected per token (top-k)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import zipfile
import zlib
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version written into every trace file; `load_trace` rejects any other."""

PASS_PREFILL = 0
PASS_DECODE = 1
PASS_KIND_NAMES = {PASS_PREFILL: "prefill", PASS_DECODE: "decode"}

MISSING_EXPERT = -1
"""Value of `expert_ids` in a cell whose routing is unknown."""


class TraceError(ValueError):
    """Invalid trace data; the message names the file, field, index, expected and actual value."""


def trace_error(origin: str, field: str, index: Any, expected: str, actual: Any, *, line: int | None = None) -> TraceError:
    """Build a `TraceError` whose message follows the project's error layout.

    `line` is the 1-based line of a text source such as JSONL; it goes right after the file name.
    """
    location = f" line {line}:" if line is not None else ""
    where = f" at index {index}" if index is not None else ""
    return TraceError(f"{origin}:{location} field '{field}'{where}: expected {expected}, got {actual}")


@dataclasses.dataclass(frozen=True)
class TraceMetadata:
    """Facts about the model and the source of a trace."""

    model: str
    num_layers: int
    num_experts: int
    top_k: int
    source: str
    synthetic: bool = False
    layer_ids: tuple[int, ...] | None = None  # the model's own numbers of the MoE layers, if known
    notes: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, origin: str) -> TraceMetadata:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise trace_error(origin, "metadata", None, "a JSON object", f"invalid JSON ({error})") from None
        if not isinstance(raw, dict):
            raise trace_error(origin, "metadata", None, "a JSON object", type(raw).__name__)
        names = {f.name for f in dataclasses.fields(cls)}
        required = {"model", "num_layers", "num_experts", "top_k", "source"}
        missing = sorted(required - raw.keys())
        if missing:
            raise trace_error(origin, "metadata", None, f"keys {sorted(required)}", f"missing {missing}")
        unknown = sorted(raw.keys() - names)
        if unknown:
            raise trace_error(origin, "metadata", None, f"only keys {sorted(names)}", f"unknown {unknown}")
        _check_metadata_types(raw, origin)
        if raw.get("layer_ids") is not None:
            raw["layer_ids"] = tuple(raw["layer_ids"])
        return cls(**raw)


def _is_json_int(value: Any) -> bool:
    # bool is a subclass of int in Python, so `true` would otherwise pass as 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_metadata_types(raw: dict[str, Any], origin: str) -> None:
    """Raise `TraceError` unless every metadata value has the JSON type of its field."""
    for field in ("model", "source", "notes"):
        if field in raw and not isinstance(raw[field], str):
            raise trace_error(origin, f"metadata.{field}", None, "a string", json.dumps(raw[field]))
    for field in ("num_layers", "num_experts", "top_k"):
        if not _is_json_int(raw[field]):
            raise trace_error(origin, f"metadata.{field}", None, "an integer", json.dumps(raw[field]))
    if "synthetic" in raw and not isinstance(raw["synthetic"], bool):
        raise trace_error(origin, "metadata.synthetic", None, "true or false", json.dumps(raw["synthetic"]))
    layer_ids = raw.get("layer_ids")
    if layer_ids is not None and not (isinstance(layer_ids, list) and all(_is_json_int(x) for x in layer_ids)):
        raise trace_error(origin, "metadata.layer_ids", None, "a list of integers or null", json.dumps(layer_ids))


@dataclasses.dataclass(frozen=True, eq=False)
class Trace:
    """Routing of a sequence of forward passes.

    Attributes:
      expert_ids: int16 [N, L, K], each token's selected experts in rank order; `MISSING_EXPERT` in
        every slot of a missing cell.
      missing: bool [N, L], True where the routing of (token, layer) is unknown. Such a cell adds no
        request to the simulation; it is never filled in.
      pass_offsets: int64 [T + 1], pass p covers tokens pass_offsets[p] .. pass_offsets[p + 1] - 1.
      pass_kind: int8 [T], `PASS_PREFILL` or `PASS_DECODE`.
      pass_sequence: int32 [T], the sequence (request) id >= 0 of each pass. The passes of one sequence
        are contiguous, and ids need not be consecutive or ascending.
      metadata: model and source facts.
      scores: float32 [N, L, K] router scores of the selected experts (NaN in missing cells), or None.
      router_logits: float32 [N, L, E] full router logits (NaN in missing cells), or None.
      speculative_logits: float32 [N, L, E], MoE layer l + 1's router applied to the hidden state that
        enters layer l, so a gate-speculative prefetcher can be replayed without the model; NaN for the
        last layer and in missing cells. None when unknown.
    """

    expert_ids: np.ndarray
    missing: np.ndarray
    pass_offsets: np.ndarray
    pass_kind: np.ndarray
    pass_sequence: np.ndarray
    metadata: TraceMetadata
    scores: np.ndarray | None = None
    router_logits: np.ndarray | None = None
    speculative_logits: np.ndarray | None = None

    @property
    def num_passes(self) -> int:
        return int(self.pass_offsets.shape[0] - 1)

    @property
    def num_tokens(self) -> int:
        return int(self.expert_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return self.metadata.num_layers

    @property
    def num_experts(self) -> int:
        return self.metadata.num_experts

    @property
    def top_k(self) -> int:
        return self.metadata.top_k

    @property
    def num_missing_cells(self) -> int:
        return int(self.missing.sum())

    @property
    def name(self) -> str:
        """Short label used in reports; synthetic traces always carry the word "synthetic"."""
        label = self.metadata.model
        if self.metadata.synthetic and "synthetic" not in label:
            label = f"synthetic:{label}"
        return label

    def validate(self, origin: str = "<trace>") -> Trace:
        """Check every invariant of the format; raise `TraceError` on the first violation."""
        validate_trace(self, origin)
        return self


def first_index(mask: np.ndarray) -> tuple[int, ...]:
    """Return the index of the first True entry of `mask`, as plain ints."""
    return tuple(int(i) for i in np.argwhere(mask)[0])


def check_array(origin: str, field: str, value: Any, ndim: int, kinds: str, kind_text: str) -> None:
    """Raise `TraceError` unless `value` is a numpy array with `ndim` dimensions and a dtype kind in `kinds`."""
    if not isinstance(value, np.ndarray):
        raise trace_error(origin, field, None, "a numpy array", type(value).__name__)
    if value.ndim != ndim:
        raise trace_error(origin, field, None, f"{ndim} dimensions", f"shape {value.shape}")
    if value.dtype.kind not in kinds:
        raise trace_error(origin, field, None, kind_text, f"dtype {value.dtype}")


def _check_pass_sequence(sequence: np.ndarray, origin: str) -> None:
    """Require sequence ids >= 0, with the passes of each sequence contiguous in the trace.

    Ids are labels, so they need not be consecutive or ascending. Per-sequence analyses compare each
    pass with the one before it, so a sequence that resumes after another one started is rejected.
    """
    negative = sequence < 0
    if negative.any():
        index = first_index(negative)[0]
        raise trace_error(origin, "pass_sequence", index, "a sequence id >= 0", int(sequence[index]))
    starts = np.flatnonzero(np.diff(sequence) != 0) + 1
    run_ids = sequence[np.concatenate(([0], starts))]
    _, first_run = np.unique(run_ids, return_index=True)
    if len(first_run) < len(run_ids):
        run = int(np.setdiff1d(np.arange(len(run_ids)), first_run)[0])
        index = int(starts[run - 1])
        previous_pass = int(np.flatnonzero(sequence[:index] == sequence[index])[-1])
        raise trace_error(
            origin, "pass_sequence", index,
            f"a sequence id not used before (the passes of one sequence must be contiguous, and sequence "
            f"{int(sequence[index])} ended at pass {previous_pass})",
            int(sequence[index]),
        )


def validate_trace(trace: Trace, origin: str = "<trace>") -> None:
    """Raise `TraceError` unless every field of `trace` is consistent with the format above."""
    meta = trace.metadata
    for field in ("num_layers", "num_experts", "top_k"):
        value = getattr(meta, field)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise trace_error(origin, f"metadata.{field}", None, "a positive integer", repr(value))
    if not isinstance(meta.synthetic, (bool, np.bool_)):
        raise trace_error(origin, "metadata.synthetic", None, "True or False", repr(meta.synthetic))
    for field in ("model", "source", "notes"):
        value = getattr(meta, field)
        if not isinstance(value, str):
            raise trace_error(origin, f"metadata.{field}", None, "a string", repr(value))
    if meta.top_k > meta.num_experts:
        raise trace_error(origin, "metadata.top_k", None, f"at most num_experts={meta.num_experts}", meta.top_k)
    if meta.num_experts > np.iinfo(np.int16).max:
        raise trace_error(origin, "metadata.num_experts", None, "at most 32767", meta.num_experts)
    if meta.layer_ids is not None and len(meta.layer_ids) != meta.num_layers:
        raise trace_error(origin, "metadata.layer_ids", None, f"{meta.num_layers} entries", len(meta.layer_ids))
    L, E, K = meta.num_layers, meta.num_experts, meta.top_k

    # Shapes and dtypes.
    check_array(origin, "expert_ids", trace.expert_ids, 3, "iu", "an integer dtype")
    N = trace.expert_ids.shape[0]
    if trace.expert_ids.shape[1:] != (L, K):
        raise trace_error(origin, "expert_ids", None, f"shape (tokens, {L}, {K})", f"shape {trace.expert_ids.shape}")
    check_array(origin, "missing", trace.missing, 2, "b", "dtype bool")
    if trace.missing.shape != (N, L):
        raise trace_error(origin, "missing", None, f"shape ({N}, {L})", f"shape {trace.missing.shape}")
    check_array(origin, "pass_offsets", trace.pass_offsets, 1, "iu", "an integer dtype")
    T = trace.pass_offsets.shape[0] - 1
    if T < 1:
        raise trace_error(origin, "pass_offsets", None, "at least 2 entries (one pass)", trace.pass_offsets.shape[0])
    for field in ("pass_kind", "pass_sequence"):
        value = getattr(trace, field)
        check_array(origin, field, value, 1, "iu", "an integer dtype")
        if value.shape != (T,):
            raise trace_error(origin, field, None, f"shape ({T},) (one entry per pass)", f"shape {value.shape}")

    # Pass layout: offsets start at 0, strictly increase, and end at the token count.
    offsets = trace.pass_offsets
    if offsets[0] != 0:
        raise trace_error(origin, "pass_offsets", 0, "0", int(offsets[0]))
    steps = np.diff(offsets)
    if np.any(steps < 1):
        index = first_index(steps < 1)[0] + 1
        raise trace_error(origin, "pass_offsets", index, f"> {int(offsets[index - 1])} (every pass has a token)", int(offsets[index]))
    if offsets[-1] != N:
        raise trace_error(origin, "pass_offsets", T, f"the token count {N}", int(offsets[-1]))
    bad_kind = ~np.isin(trace.pass_kind, list(PASS_KIND_NAMES))
    if bad_kind.any():
        index = first_index(bad_kind)[0]
        raise trace_error(origin, "pass_kind", index, f"one of {sorted(PASS_KIND_NAMES)}", int(trace.pass_kind[index]))
    decode_long = (trace.pass_kind == PASS_DECODE) & (steps != 1)
    if decode_long.any():
        index = first_index(decode_long)[0]
        raise trace_error(origin, "pass_offsets", index, "1 token in a decode pass", int(steps[index]))
    _check_pass_sequence(trace.pass_sequence, origin)

    # Expert ids: in range where present, all MISSING_EXPERT where missing, distinct within a top-k.
    ids = trace.expert_ids
    present = ~trace.missing
    out_of_range = present[:, :, None] & ((ids < 0) | (ids >= E))
    if out_of_range.any():
        index = first_index(out_of_range)
        raise trace_error(origin, "expert_ids", index, f"an expert id in [0, {E})", int(ids[index]))
    not_marked = trace.missing[:, :, None] & (ids != MISSING_EXPERT)
    if not_marked.any():
        index = first_index(not_marked)
        raise trace_error(origin, "expert_ids", index, f"{MISSING_EXPERT} in a missing cell", int(ids[index]))
    if K > 1:
        ordered = np.sort(ids, axis=-1)
        repeated = present & np.any(ordered[:, :, 1:] == ordered[:, :, :-1], axis=-1)
        if repeated.any():
            token, layer = first_index(repeated)
            raise trace_error(origin, "expert_ids", (token, layer), "distinct experts within one top-k", ids[token, layer].tolist())

    # Optional score arrays: finite and non-negative where present (logits may be negative).
    if trace.scores is not None:
        check_array(origin, "scores", trace.scores, 3, "f", "a float dtype")
        if trace.scores.shape != ids.shape:
            raise trace_error(origin, "scores", None, f"shape {ids.shape}", f"shape {trace.scores.shape}")
        scores = trace.scores
        bad = present[:, :, None] & ~(np.isfinite(scores) & (scores >= 0))
        if bad.any():
            index = first_index(bad)
            raise trace_error(origin, "scores", index, "a finite score >= 0", float(scores[index]))
    if trace.router_logits is not None:
        check_array(origin, "router_logits", trace.router_logits, 3, "f", "a float dtype")
        if trace.router_logits.shape != (N, L, E):
            raise trace_error(origin, "router_logits", None, f"shape ({N}, {L}, {E})", f"shape {trace.router_logits.shape}")
        bad = present[:, :, None] & ~np.isfinite(trace.router_logits)
        if bad.any():
            index = first_index(bad)
            raise trace_error(origin, "router_logits", index, "a finite logit", float(trace.router_logits[index]))
    if trace.speculative_logits is not None:
        speculative = trace.speculative_logits
        check_array(origin, "speculative_logits", speculative, 3, "f", "a float dtype")
        if speculative.shape != (N, L, E):
            raise trace_error(origin, "speculative_logits", None, f"shape ({N}, {L}, {E})", f"shape {speculative.shape}")
        bad = present[:, :-1, None] & ~np.isfinite(speculative[:, :-1])
        if bad.any():
            index = first_index(bad)
            raise trace_error(origin, "speculative_logits", index, "a finite logit", float(speculative[index]))
        last = ~np.isnan(speculative[:, -1])
        if last.any():
            token, expert = first_index(last)
            index = (token, L - 1, expert)
            raise trace_error(origin, "speculative_logits", index, "NaN for the last MoE layer (no next layer)", float(speculative[index]))


def _cast(value: Any, kinds: str, dtype: type) -> np.ndarray:
    """Convert to the canonical dtype when the kind already fits; leave it for validation otherwise."""
    array = np.asarray(value)
    return array.astype(dtype) if array.dtype.kind in kinds else array


def make_trace(
    expert_ids: np.ndarray,
    metadata: TraceMetadata,
    *,
    missing: np.ndarray | None = None,
    pass_offsets: np.ndarray | None = None,
    pass_kind: np.ndarray | None = None,
    pass_sequence: np.ndarray | None = None,
    scores: np.ndarray | None = None,
    router_logits: np.ndarray | None = None,
    speculative_logits: np.ndarray | None = None,
    origin: str = "<trace>",
) -> Trace:
    """Build and validate a trace; by default every token is its own decode pass of one sequence."""
    expert_ids = np.asarray(expert_ids)
    if expert_ids.ndim != 3:
        raise trace_error(origin, "expert_ids", None, "3 dimensions (tokens, layers, top_k)", f"shape {expert_ids.shape}")
    num_tokens = expert_ids.shape[0]
    if missing is None:
        missing = np.zeros(expert_ids.shape[:2], dtype=bool)
    if pass_offsets is None:
        pass_offsets = np.arange(num_tokens + 1, dtype=np.int64)
    num_passes = len(pass_offsets) - 1
    if pass_kind is None:
        pass_kind = np.full(num_passes, PASS_DECODE, dtype=np.int8)
    if pass_sequence is None:
        pass_sequence = np.zeros(num_passes, dtype=np.int32)
    if expert_ids.dtype.kind in "iu" and expert_ids.size:
        low, high = int(expert_ids.min()), int(expert_ids.max())
        if high > np.iinfo(np.int16).max or low < np.iinfo(np.int16).min:
            raise trace_error(origin, "expert_ids", None, "values that fit int16", f"range [{low}, {high}]")
    trace = Trace(
        expert_ids=_cast(expert_ids, "iu", np.int16),
        missing=np.asarray(missing),
        pass_offsets=_cast(pass_offsets, "iu", np.int64),
        pass_kind=_cast(pass_kind, "iu", np.int8),
        pass_sequence=_cast(pass_sequence, "iu", np.int32),
        metadata=metadata,
        scores=None if scores is None else _cast(scores, "f", np.float32),
        router_logits=None if router_logits is None else _cast(router_logits, "f", np.float32),
        speculative_logits=None if speculative_logits is None else _cast(speculative_logits, "f", np.float32),
    )
    return trace.validate(origin)


_ARRAY_FIELDS = ("expert_ids", "missing", "pass_offsets", "pass_kind", "pass_sequence")
_OPTIONAL_FIELDS = ("scores", "router_logits", "speculative_logits")


def save_trace(trace: Trace, path: str | os.PathLike) -> None:
    """Write `trace` as a compressed `.npz` of format `FORMAT_VERSION`."""
    trace.validate(str(path))
    arrays: dict[str, np.ndarray] = {name: getattr(trace, name) for name in _ARRAY_FIELDS}
    for name in _OPTIONAL_FIELDS:
        value = getattr(trace, name)
        if value is not None:
            arrays[name] = value
    arrays["format_version"] = np.asarray(FORMAT_VERSION, dtype=np.int32)
    arrays["metadata"] = np.asarray(trace.metadata.to_json())
    with open(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def is_canonical_npz(path: str | os.PathLike) -> bool:
    """Tell whether `path` is an `.npz` written by `save_trace` (it has a `format_version` entry)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return "format_version.npy" in archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def read_npz(path: str | os.PathLike, kind: str, hint: str = "") -> dict[str, np.ndarray]:
    """Read every member of an `.npz` archive; raise `TraceError` naming the file for unreadable input.

    `kind` names the expected format in messages ("FLAME-MoE", "specmd-jax trace"); `hint` is appended to
    the message for a file that is not an archive at all. Members holding pickled objects are rejected.
    """
    origin = str(path)
    if not os.path.exists(path):
        raise TraceError(f"{origin}: file not found")
    if os.path.isdir(path):
        raise TraceError(f"{origin}: is a directory, expected a {kind} .npz file")
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
        is_zip = zipfile.is_zipfile(path)
    except OSError as error:
        raise TraceError(f"{origin}: cannot read the file ({error})") from None
    if not head:
        raise TraceError(f"{origin}: empty file, expected a {kind} .npz archive")
    if not is_zip:
        # np.load would report a text file as "pickled data", so a clearer message is raised here.
        if head in _ZIP_MAGIC:
            raise TraceError(f"{origin}: truncated or corrupt .npz archive (its zip directory is missing)")
        raise TraceError(f"{origin}: not an .npz archive (the file does not start with a zip header, got {head!r}){hint}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        # ValueError also covers members that hold pickled objects instead of plain arrays.
        raise TraceError(f"{origin}: truncated or corrupt .npz member ({error})") from None


def load_trace(path: str | os.PathLike) -> Trace:
    """Read a trace written by `save_trace`; raise `TraceError` on an unknown version or bad data."""
    origin = str(path)
    archive = read_npz(path, "specmd-jax trace", "; convert other formats with `specmd-jax traces convert`")
    keys = set(archive)
    if "format_version" not in keys:
        raise trace_error(origin, "format_version", None, f"version {FORMAT_VERSION}", "no such key (not a specmd-jax trace file)")
    stored_version = archive["format_version"]
    if stored_version.dtype.kind not in "iu" or stored_version.ndim != 0:
        raise trace_error(origin, "format_version", None, f"an integer scalar ({FORMAT_VERSION})", f"{stored_version.dtype} array of shape {stored_version.shape}")
    version = int(stored_version)
    if version != FORMAT_VERSION:
        raise trace_error(
            origin, "format_version", None, f"version {FORMAT_VERSION}",
            f"version {version} (written by another specmd-jax release; convert it with that release)",
        )
    absent = [name for name in (*_ARRAY_FIELDS, "metadata") if name not in keys]
    if absent:
        raise trace_error(origin, absent[0], None, "a stored array", "no such key")
    metadata = TraceMetadata.from_json(str(archive["metadata"]), origin)
    fields = {name: archive[name] for name in _ARRAY_FIELDS}
    for name in _OPTIONAL_FIELDS:
        fields[name] = archive.get(name)
    return Trace(metadata=metadata, **fields).validate(origin)

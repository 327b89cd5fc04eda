"""Load a trace from any supported file format, detected by the file's content rather than its name."""

from __future__ import annotations

import os
import zipfile

from specmd_jax.traces.flame import load_flame_npz
from specmd_jax.traces.mixtral import load_mixtral_jsonl
from specmd_jax.traces.trace import Trace, TraceError, load_trace

SYNTHETIC_PREFIX = "synthetic:"

ACCEPTED_FORMATS = (
    "a specmd-jax trace .npz (with a 'format_version' member), "
    "a FLAME-MoE routing .npz (with 'expert_ids' and 'probs' members), "
    "a Mixtral routing JSONL file (one JSON object per line), "
    f"or a '{SYNTHETIC_PREFIX}...' spec"
)

_JSON_WHITESPACE = b" \t\r\n"
# A local file header, or the end record of an empty archive.
_ZIP_HEADERS = (b"PK\x03\x04", b"PK\x05\x06")
_PEEK_BYTES = 4096


def load_any(path_or_spec: str | os.PathLike) -> Trace:
    """Load a trace file of any supported format, or generate a trace from a `synthetic:` spec.

    A zip archive is a canonical trace when it has a `format_version` member, and a FLAME-MoE sample
    when it has `expert_ids` or `probs` instead. A file whose first non-blank byte is `{` is read as
    Mixtral JSONL. Anything else raises `TraceError` naming the file and the accepted formats.
    """
    if isinstance(path_or_spec, str) and path_or_spec.startswith(SYNTHETIC_PREFIX):
        # Imported here so that loading real traces never depends on the synthetic generator.
        from specmd_jax.traces.synthetic import load_synthetic

        return load_synthetic(path_or_spec)

    path = os.fspath(path_or_spec)
    if not os.path.exists(path):
        raise TraceError(f"{path}: file not found. Accepted inputs: {ACCEPTED_FORMATS}")
    if os.path.isdir(path):
        raise TraceError(f"{path}: is a directory. Accepted inputs: {ACCEPTED_FORMATS}")

    if _starts_with_zip_header(path):
        if not zipfile.is_zipfile(path):
            raise TraceError(f"{path}: truncated or corrupt .npz archive (its zip directory is missing)")
        return _load_npz(path)
    first_byte = _first_non_blank_byte(path)
    if first_byte is None:
        raise TraceError(f"{path}: empty file. Accepted inputs: {ACCEPTED_FORMATS}")
    if first_byte == b"{":
        return load_mixtral_jsonl(path)
    raise TraceError(f"{path}: unrecognized file format (first non-blank byte {first_byte!r}). Accepted inputs: {ACCEPTED_FORMATS}")


def _load_npz(path: str) -> Trace:
    try:
        with zipfile.ZipFile(path) as archive:
            members = {name.removesuffix(".npy") for name in archive.namelist()}
    except (zipfile.BadZipFile, OSError) as error:
        raise TraceError(f"{path}: truncated or corrupt .npz archive ({error})") from None
    if "format_version" in members:
        return load_trace(path)
    if "expert_ids" in members or "probs" in members:
        return load_flame_npz(path)
    raise TraceError(f"{path}: unrecognized .npz archive with members {sorted(members)}. Accepted inputs: {ACCEPTED_FORMATS}")


def _first_non_blank_byte(path: str) -> bytes | None:
    """Return the first byte that is not JSON whitespace, or None when the file has none."""
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(_PEEK_BYTES):
                stripped = chunk.lstrip(_JSON_WHITESPACE)
                if stripped:
                    return stripped[:1]
    except OSError as error:
        raise TraceError(f"{path}: cannot read the file ({error})") from None
    return None


def _starts_with_zip_header(path: str) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) in _ZIP_HEADERS
    except OSError as error:
        raise TraceError(f"{path}: cannot read the file ({error})") from None

"""Routing traces: the canonical type, loaders of other formats, statistics and a synthetic generator."""

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

__all__ = [
    "FORMAT_VERSION",
    "MISSING_EXPERT",
    "PASS_DECODE",
    "PASS_PREFILL",
    "Trace",
    "TraceError",
    "TraceMetadata",
    "load_trace",
    "make_trace",
    "save_trace",
]

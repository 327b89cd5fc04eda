"""Loader for FLAME-MoE routing samples stored as `.npz`.

The file contains one teacher-forced token stream. Its arrays are laid out [layers, tokens, k]:

  layers         int (L,)         the model's numbers of the MoE layers, in execution order
  token_ids      int (N,)         input token ids
  expert_ids     int (L, N, K)    selected experts of each token, in rank order
  probs          float (L, N, K)  router softmax probability of each selected expert
  stream_offset  int (N,)         position of each token in the captured stream

Every token becomes one decode pass of a single sequence, because a teacher-forced forward pass routes
each token exactly as a decoder would in stream order. `probs` become `Trace.scores` unchanged (they are
not renormalised over the top-k).
"""

from __future__ import annotations

import os

import numpy as np

from specmd_jax.traces.trace import Trace, TraceMetadata, check_array, first_index, make_trace, read_npz, trace_error

FLAME_MODEL = "flame-moe-290m"
FLAME_NUM_EXPERTS = 64
"""Routed experts per MoE layer of FLAME-MoE-290M (its 2 shared experts are not in the trace)."""

FLAME_KEYS = ("layers", "token_ids", "expert_ids", "probs", "stream_offset")



def load_flame_npz(
    path: str | os.PathLike,
    *,
    model: str = FLAME_MODEL,
    num_experts: int = FLAME_NUM_EXPERTS,
) -> Trace:
    """Read a FLAME-MoE routing `.npz` into a validated `Trace`.

    Every `TraceError` names the file, the key, the index in the file's own [layer, token, k] axes,
    and the expected and actual value. It is raised for an unreadable file, a missing or unknown key,
    a wrong dtype or shape, and an expert id outside [0, num_experts). Repeated experts within one
    top-k and a probability that is NaN, infinite or outside [0, 1] raise it too. Float `probs` of
    another width are converted to float32, the canonical score dtype.
    """
    origin = str(path)
    arrays = _read_arrays(path, origin)

    layer_ids = _check_layers(arrays["layers"], origin)
    num_tokens, top_k = _check_shapes(arrays, origin, num_layers=len(layer_ids), num_experts=num_experts)
    _check_stream_offset(arrays["stream_offset"], origin)
    _check_token_ids(arrays["token_ids"], origin)
    _check_expert_ids(arrays["expert_ids"], origin, num_experts)
    _check_probs(arrays["probs"], origin)

    offsets = arrays["stream_offset"]
    metadata = TraceMetadata(
        model=model,
        num_layers=len(layer_ids),
        num_experts=num_experts,
        top_k=top_k,
        source=origin,
        layer_ids=layer_ids,
        notes=(
            f"teacher-forced token stream, one decode pass per token; "
            f"{num_tokens} tokens at stream offsets {int(offsets[0])}..{int(offsets[-1])}"
        ),
    )
    # The file stores [layer, token, k], and the trace axes are [token, layer, k].
    expert_ids = np.ascontiguousarray(arrays["expert_ids"].transpose(1, 0, 2))
    scores = np.ascontiguousarray(arrays["probs"].transpose(1, 0, 2), dtype=np.float32)
    return make_trace(expert_ids, metadata, scores=scores, origin=origin)


def _read_arrays(path: str | os.PathLike, origin: str) -> dict[str, np.ndarray]:
    """Read the archive and check that it has exactly the FLAME-MoE keys."""
    arrays = read_npz(path, "FLAME-MoE")
    names = sorted(arrays)
    absent = [key for key in FLAME_KEYS if key not in names]
    if absent:
        raise trace_error(origin, absent[0], None, f"the keys {list(FLAME_KEYS)}", f"no such key (the archive has {names})")
    unknown = [key for key in names if key not in FLAME_KEYS]
    if unknown:
        raise trace_error(origin, unknown[0], None, f"only the keys {list(FLAME_KEYS)}", f"unknown keys {unknown}")
    return {key: arrays[key] for key in FLAME_KEYS}


def _check_layers(layers: np.ndarray, origin: str) -> tuple[int, ...]:
    """Return the layer numbers after checking that they are non-negative and increase (execution order)."""
    check_array(origin, "layers", layers, 1, "iu", "an integer dtype")
    if layers.shape[0] == 0:
        raise trace_error(origin, "layers", None, "at least one MoE layer", "shape (0,)")
    negative = np.flatnonzero(layers < 0)
    if negative.size:
        index = int(negative[0])
        raise trace_error(origin, "layers", index, "a layer number >= 0", int(layers[index]))
    not_increasing = np.flatnonzero(np.diff(layers.astype(np.int64)) <= 0)
    if not_increasing.size:
        index = int(not_increasing[0]) + 1
        raise trace_error(origin, "layers", index, f"a layer number > {int(layers[index - 1])} (increasing order)", int(layers[index]))
    return tuple(int(layer) for layer in layers)


def _check_shapes(arrays: dict[str, np.ndarray], origin: str, num_layers: int, num_experts: int) -> tuple[int, int]:
    """Check dtypes and that all arrays agree on the layer and token counts, and return (tokens, top_k)."""
    expert_ids = arrays["expert_ids"]
    check_array(origin, "expert_ids", expert_ids, 3, "iu", "an integer dtype")
    layers_in_ids, num_tokens, top_k = expert_ids.shape
    if layers_in_ids != num_layers:
        raise trace_error(
            origin, "expert_ids", None, f"shape ({num_layers}, tokens, k) with one row per entry of 'layers'", f"shape {expert_ids.shape}"
        )
    if num_tokens == 0:
        raise trace_error(origin, "expert_ids", None, "at least one token", f"shape {expert_ids.shape}")
    if not 1 <= top_k <= num_experts:
        raise trace_error(origin, "expert_ids", None, f"a top-k between 1 and {num_experts} on axis 2", f"shape {expert_ids.shape}")

    probs = arrays["probs"]
    check_array(origin, "probs", probs, 3, "f", "a float dtype")
    if probs.shape != expert_ids.shape:
        raise trace_error(origin, "probs", None, f"shape {expert_ids.shape} (the shape of 'expert_ids')", f"shape {probs.shape}")

    for field in ("token_ids", "stream_offset"):
        array = arrays[field]
        check_array(origin, field, array, 1, "iu", "an integer dtype")
        if array.shape != (num_tokens,):
            raise trace_error(origin, field, None, f"shape ({num_tokens},) (one entry per token of 'expert_ids')", f"shape {array.shape}")
    return num_tokens, top_k


def _check_stream_offset(stream_offset: np.ndarray, origin: str) -> None:
    """Require increasing offsets, because the loader keeps the file's token order as execution order."""
    not_increasing = np.flatnonzero(np.diff(stream_offset.astype(np.int64)) <= 0)
    if not_increasing.size:
        index = int(not_increasing[0]) + 1
        raise trace_error(
            origin, "stream_offset", index, f"an offset > {int(stream_offset[index - 1])} (tokens in stream order)", int(stream_offset[index])
        )


def _check_token_ids(token_ids: np.ndarray, origin: str) -> None:
    negative = np.flatnonzero(token_ids < 0)
    if negative.size:
        index = int(negative[0])
        raise trace_error(origin, "token_ids", index, "a token id >= 0", int(token_ids[index]))


def _check_expert_ids(expert_ids: np.ndarray, origin: str, num_experts: int) -> None:
    out_of_range = (expert_ids < 0) | (expert_ids >= num_experts)
    if out_of_range.any():
        index = first_index(out_of_range)
        raise trace_error(origin, "expert_ids", index, f"an expert id in [0, {num_experts})", int(expert_ids[index]))
    ordered = np.sort(expert_ids, axis=-1)
    repeated = np.any(ordered[:, :, 1:] == ordered[:, :, :-1], axis=-1)
    if repeated.any():
        layer, token = first_index(repeated)
        raise trace_error(
            origin, "expert_ids", (layer, token), "distinct experts within one top-k", expert_ids[layer, token].tolist()
        )


def _check_probs(probs: np.ndarray, origin: str) -> None:
    invalid = ~(np.isfinite(probs) & (probs >= 0) & (probs <= 1))
    if invalid.any():
        index = first_index(invalid)
        raise trace_error(origin, "probs", index, "a finite probability in [0, 1]", float(probs[index]))

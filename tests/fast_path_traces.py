"""Random routing traces shared by the tests that compare a fast path with the generic scan."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from specmd_jax.traces import PASS_DECODE, PASS_PREFILL, TraceMetadata, make_trace


def trace_from_tokens(expert_ids: np.ndarray, missing: np.ndarray, pass_lengths: np.ndarray, num_experts: int):
    """Build a trace whose passes have the given token counts; passes of more than one token are prefill."""
    num_layers, top_k = expert_ids.shape[1], expert_ids.shape[2]
    expert_ids = np.where(missing[..., None], -1, expert_ids)
    offsets = np.concatenate([[0], np.cumsum(pass_lengths)])
    kinds = np.where(pass_lengths > 1, PASS_PREFILL, PASS_DECODE).astype(np.int8)
    metadata = TraceMetadata("random", num_layers, num_experts, top_k, "fast path tests")
    return make_trace(expert_ids, metadata, missing=missing, pass_offsets=offsets, pass_kind=kinds)


def skewed_trace(seed: int, num_experts: int, top_k: int = 2, num_layers: int = 3, num_passes: int = 40):
    """Build passes of 1 to 4 tokens, with 15% of the cells missing and skewed expert popularity."""
    rng = np.random.default_rng(seed)
    pass_lengths = rng.integers(1, 5, num_passes)
    num_tokens = int(pass_lengths.sum())
    popularity = rng.dirichlet(np.full(num_experts, 0.5))
    ids = np.stack(
        [[rng.choice(num_experts, top_k, replace=False, p=popularity) for _ in range(num_layers)] for _ in range(num_tokens)]
    )
    missing = rng.random((num_tokens, num_layers)) < 0.15
    return trace_from_tokens(ids, missing, pass_lengths, num_experts)


def feasible_capacities(requests, pool_items: int) -> list[int]:
    """List pool capacities from the largest request set of a step up to every item of the pool."""
    return list(range(max(int(requests.counts.max()), 1), pool_items + 1))


@st.composite
def small_traces(draw):
    """Draw traces of 1-3 layers, 2-6 experts and 1-12 passes of 1-3 tokens, with missing cells."""
    num_layers = draw(st.integers(1, 3))
    num_experts = draw(st.integers(2, 6))
    top_k = draw(st.integers(1, min(3, num_experts)))
    num_passes = draw(st.integers(1, 12))
    pass_lengths = np.array(draw(st.lists(st.integers(1, 3), min_size=num_passes, max_size=num_passes)))
    num_tokens = int(pass_lengths.sum())
    top_k_sets = st.lists(st.integers(0, num_experts - 1), min_size=top_k, max_size=top_k, unique=True)
    cells = draw(st.lists(top_k_sets, min_size=num_tokens * num_layers, max_size=num_tokens * num_layers))
    ids = np.array(cells, np.int16).reshape(num_tokens, num_layers, top_k)
    missing_flags = draw(st.lists(st.booleans(), min_size=num_tokens * num_layers, max_size=num_tokens * num_layers))
    missing = np.array(missing_flags).reshape(num_tokens, num_layers)
    return trace_from_tokens(ids, missing, pass_lengths, num_experts)

"""The one-pass LRU stack simulator must equal the generic scan for every capacity and scope."""

from __future__ import annotations

import numpy as np
import pytest

from specmd_jax.sim import SimConfig, build_requests, run_sweep
from specmd_jax.traces import PASS_PREFILL, TraceMetadata, make_trace
from specmd_jax.traces.flame import load_flame_npz
from specmd_jax.traces.mixtral import load_mixtral_jsonl

FIELDS = ("hits", "compulsory_misses", "capacity_misses", "collision_misses", "evictions")


def _assert_same(trace, scope: str, capacities: list[int]) -> None:
    requests = build_requests(trace)
    configs = [SimConfig("lru", capacity) for capacity in capacities]
    stack = run_sweep(requests, configs, scope=scope, num_experts=trace.num_experts)
    generic = run_sweep(requests, configs, scope=scope, num_experts=trace.num_experts, fast_paths=False)
    for fast, slow in zip(stack, generic):
        for field in FIELDS:
            assert getattr(fast, field) == getattr(slow, field), (scope, fast.config.capacity, field)
        np.testing.assert_array_equal(fast.hits_per_layer, slow.hits_per_layer)
        np.testing.assert_array_equal(fast.requests_per_layer, slow.requests_per_layer)


def _random_trace(seed: int):
    rng = np.random.default_rng(seed)
    num_layers, num_experts, top_k, num_tokens = 3, 6, 2, 40
    ids = np.stack([[rng.choice(num_experts, top_k, replace=False) for _ in range(num_layers)] for _ in range(num_tokens)])
    missing = rng.random((num_tokens, num_layers)) < 0.05
    ids[missing] = -1
    # A prefill pass of 4 tokens, then one decode pass per token.
    offsets = np.concatenate([[0], np.arange(4, num_tokens + 1)])
    kinds = np.ones(len(offsets) - 1, np.int8)
    kinds[0] = PASS_PREFILL
    return make_trace(ids, TraceMetadata("random", num_layers, num_experts, top_k, "test"), missing=missing, pass_offsets=offsets, pass_kind=kinds)


@pytest.mark.parametrize("scope", ["global", "per-layer"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stack_lru_random_traces(scope: str, seed: int) -> None:
    trace = _random_trace(seed)
    needed = int(build_requests(trace).counts.max())
    layers = trace.num_layers if scope == "per-layer" else 1
    _assert_same(trace, scope, [needed * layers + extra * layers for extra in range(0, 6)])


@pytest.mark.parametrize("scope", ["global", "per-layer"])
def test_stack_lru_flame(flame_npz, scope: str) -> None:
    _assert_same(load_flame_npz(flame_npz), scope, [64, 80, 128, 256, 512])


@pytest.mark.parametrize("scope", ["global", "per-layer"])
def test_stack_lru_mixtral(mixtral_jsonl, scope: str) -> None:
    _assert_same(load_mixtral_jsonl(mixtral_jsonl), scope, [64, 96, 128, 256])

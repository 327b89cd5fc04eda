"""Shared test fixtures: where the real routing data lives and how its absence is handled."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("SPECMD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
FLAME_NPZ = SHARED_DATA / "flame-moe-290m_dynande-sample" / "flame_moe_290m_iter5473_seq2048.npz"
MIXTRAL_JSONL = SHARED_DATA / "mixtral-8x7b-instruct_speculative-moe" / "humaneval_2_routing.jsonl"
OLMOE_STATS = SHARED_DATA / "olmoe-mixtral_allenai-routing-analysis" / "olmoe_routing_stats.json"
QWEN3_COACTIVATION = SHARED_DATA / "qwen3-30b-a3b_mbolt-coactivation" / "coactivation_qwen3-30b-a3b.json"


def require_shared(path: Path) -> Path:
    """Return `path`; skip the test if it is absent, or fail when SPECMD_REQUIRE_SHARED_DATA=1."""
    if path.exists():
        return path
    message = f"shared data file not found: {path} (set SPECMD_SHARED_DATA to the data folder)"
    if os.environ.get("SPECMD_REQUIRE_SHARED_DATA") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def flame_npz() -> Path:
    return require_shared(FLAME_NPZ)


@pytest.fixture
def mixtral_jsonl() -> Path:
    return require_shared(MIXTRAL_JSONL)


MAX_MEMORY_MAPPINGS = 30_000
"""Drop JAX's compiled programs once the process has this many memory mappings (see below)."""


def count_memory_mappings() -> int | None:
    """Return the number of memory mappings of this process, or None where /proc is not available."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return None


@pytest.fixture(autouse=True)
def release_compiled_programs():
    """Drop JAX's compiled programs when too many memory mappings have built up.

    The suite compiles thousands of programs in one process. Kept alive, their memory mappings reached
    Linux's default limit of 65,530 per process (vm.max_map_count), where XLA crashed with a
    segmentation fault while compiling. One test module alone reached about 43,000.
    """
    yield
    count = count_memory_mappings()
    if count is not None and count > MAX_MEMORY_MAPPINGS:
        import jax

        jax.clear_caches()

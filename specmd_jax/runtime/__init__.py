"""Offloaded MoE execution: routed experts in host memory, a fixed-size device cache of expert slots, and a
cache manager that decides with the simulator's own policy functions (see docs/runtime.md)."""

from specmd_jax.runtime.execution import OffloadedModel
from specmd_jax.runtime.experts import EXPERT_WEIGHTS, HostExperts, SlotCache
from specmd_jax.runtime.generate import PREFETCHERS, OffloadedRun, offloaded_generate
from specmd_jax.runtime.link import Link, Transfer
from specmd_jax.runtime.manager import ExpertCacheManager, PrefetchContext, PrefetchDecision, StepRecord
from specmd_jax.runtime.prefetch import EnginePrefetcher, GateCandidates, OracleCandidates

__all__ = [
    "EXPERT_WEIGHTS", "PREFETCHERS", "EnginePrefetcher", "ExpertCacheManager", "GateCandidates", "HostExperts", "Link",
    "OffloadedModel", "OffloadedRun", "OracleCandidates", "PrefetchContext", "PrefetchDecision", "SlotCache",
    "StepRecord", "Transfer", "offloaded_generate",
]

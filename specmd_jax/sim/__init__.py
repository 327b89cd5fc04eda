"""The cache simulator: request tensors, the scan loop and sweeps."""

from specmd_jax.sim.engine import simulate_batch
from specmd_jax.sim.requests import StepRequests, build_requests
from specmd_jax.prefetch.registry import PrefetchConfig
from specmd_jax.sim.sweep import (
    Capacity,
    CapacityError,
    PrefetchInputs,
    SimConfig,
    SimResult,
    check_capacity,
    pool_capacity,
    run_sweep,
)

__all__ = [
    "Capacity",
    "CapacityError",
    "PrefetchConfig",
    "PrefetchInputs",
    "SimConfig",
    "SimResult",
    "StepRequests",
    "build_requests",
    "check_capacity",
    "pool_capacity",
    "run_sweep",
    "simulate_batch",
]

"""Per-layer Belady on host devices whose count does not divide the layer count.

Spreading layers over the devices pads the layer axis and renumbers next-request steps p * L + l to
p * L' + l with L' > L, so the OPT stack's keys grow by L' / L, and `fits_int32` must check them after
that growth. This trace prefix has keys that fit int32 for 3 layers but not for the 4 padded layers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

PADDED_KEYS_SCRIPT = textwrap.dedent(
    """
    import jax
    import numpy as np
    from specmd_jax.policies.base import NEVER
    from specmd_jax.sim import SimConfig, run_sweep
    from specmd_jax.sim.requests import StepRequests

    assert jax.device_count() == 2, jax.devices()
    num_layers, num_experts = 3, 8
    # far_step is a layer-0 step (a multiple of 3). 8 x far_step fits int32, but 8 x far_step x 4 / 3 does not.
    far_step = 240_000_000
    experts = np.full((3, num_layers, 2), -1, np.int32)
    next_step = np.full((3, num_layers, 2), -1, np.int32)
    # Layer 0 of a 3-pass prefix requests {0, 1}, then {2}, then {1}. Expert 0 is next requested far
    # beyond the prefix, so Belady with 2 slots evicts it at pass 1 and pass 2 hits expert 1.
    experts[0, 0], next_step[0, 0] = [0, 1], [far_step, 6]
    experts[1, 0, 0], next_step[1, 0, 0] = 2, 9
    experts[2, 0, 0], next_step[2, 0, 0] = 1, NEVER
    requests = StepRequests(experts, next_step, (experts >= 0).sum(-1).astype(np.int32))
    configs = [SimConfig("belady", 2 * num_layers)]
    (fast,) = run_sweep(requests, configs, scope="per-layer", num_experts=num_experts)
    (scan,) = run_sweep(requests, configs, scope="per-layer", num_experts=num_experts, fast_paths=False)
    print(f"hits: fast path {fast.hits}, generic scan {scan.hits}")
    assert scan.hits == 1, scan.hits
    assert fast.hits == scan.hits, (fast.hits, scan.hits)
    assert fast.evictions == scan.evictions, (fast.evictions, scan.evictions)
    print("padded keys match the scan")
    """
)


def test_belady_padded_keys_fit_int32() -> None:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", PADDED_KEYS_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "padded keys match the scan" in result.stdout

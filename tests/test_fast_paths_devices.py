"""The fast paths spread layers or capacities over two host devices and must still equal the generic scan."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

# Runs in a fresh process, because the host device count is fixed when JAX starts.
TWO_DEVICE_SCRIPT = textwrap.dedent(
    """
    import jax
    import numpy as np
    from specmd_jax.sim import SimConfig, build_requests, run_sweep
    from specmd_jax.traces import TraceMetadata, make_trace

    assert jax.device_count() == 2, jax.devices()
    rng = np.random.default_rng(7)
    # 3 layers, so spreading layers over 2 devices pads one empty layer; 1 layer stays on one device.
    for num_layers in (3, 1):
        num_tokens, num_experts, top_k = 60, 9, 2
        ids = np.stack([[rng.choice(num_experts, top_k, replace=False) for _ in range(num_layers)] for _ in range(num_tokens)])
        missing = rng.random((num_tokens, num_layers)) < 0.1
        ids[missing] = -1
        trace = make_trace(ids, TraceMetadata("random", num_layers, num_experts, top_k, "two devices"), missing=missing)
        requests = build_requests(trace)
        smallest = int(requests.counts.max())
        fields = ("hits", "compulsory_misses", "capacity_misses", "collision_misses", "evictions")
        for scope, layers in (("per-layer", num_layers), ("global", 1)):
            for policy in ("lru", "fifo", "least-stale", "belady"):
                # An odd number of capacities, so spreading capacities over the devices pads the batch too.
                configs = [SimConfig(policy, (smallest + extra) * layers) for extra in (0, 2, 5)]
                fast = run_sweep(requests, configs, scope=scope, num_experts=num_experts)
                slow = run_sweep(requests, configs, scope=scope, num_experts=num_experts, fast_paths=False)
                for a, b in zip(fast, slow):
                    where = (num_layers, scope, policy, a.config.capacity)
                    for field in fields:
                        assert getattr(a, field) == getattr(b, field), where + (field,)
                    assert np.array_equal(a.hits_per_layer, b.hits_per_layer), where
    print("fast paths equal the scan on 2 devices")
    """
)


def test_fast_paths_on_two_host_devices() -> None:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", TWO_DEVICE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fast paths equal the scan on 2 devices" in result.stdout


def test_zero_passes_take_the_generic_scan() -> None:
    """Requests sliced to zero passes give zero totals on every path instead of failing."""
    import numpy as np

    from specmd_jax.sim import SimConfig, run_sweep
    from specmd_jax.sim.requests import StepRequests

    experts = np.full((0, 2, 1), -1, np.int32)
    requests = StepRequests(experts, experts.copy(), np.zeros((0, 2), np.int32))
    for scope in ("per-layer", "global"):
        for policy in ("lru", "fifo", "least-stale", "belady"):
            (result,) = run_sweep(requests, [SimConfig(policy, 2)], scope=scope, num_experts=4)
            assert result.requests == 0, (scope, policy)
            assert result.hits == 0, (scope, policy)

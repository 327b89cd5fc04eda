"""Throughput of the jitted policy sweep against libcachesim and the plain-Python reference, in one run.

Sweeps 4 policies (LRU, FIFO, Least-Stale, Belady) x 16 capacities over an OLMoE-shaped synthetic trace
(16 layers, 64 experts, top-8, one decode token per pass) and reports configuration-accesses per second:
  jax          the whole sweep through `specmd_jax.sim.run_sweep` (compile time excluded: the sweep runs
               once to compile, then is timed on a second run);
  libcachesim  the same configurations one by one (LRU, FIFO and Belady; it has no Least-Stale), each on
               its binary oracleGeneral trace, timing `process_trace` only;
  reference    tests/reference_sim.py on a prefix of the trace.
libcachesim processes the requests of a step one at a time, so its hit counts differ slightly from the
contract's step semantics; the work per access is the same.

Usage:
  python benchmarks/sim_throughput.py [--tokens 100000] [--scope per-layer] [--devices 2]
Ends with one line `speedup_vs_libcachesim=<ratio>`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

POLICIES = ("lru", "fifo", "least-stale", "belady")
LIBCACHESIM_NAMES = {"lru": "LRU", "fifo": "FIFO", "belady": "Belady"}
NUM_CAPACITIES = 16


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000, help="decode passes of the synthetic trace")
    parser.add_argument("--scope", choices=("global", "per-layer"), default="per-layer")
    parser.add_argument("--devices", type=int, default=os.cpu_count() or 1, help="XLA host devices (one thread each)")
    parser.add_argument("--reference-passes", type=int, default=200, help="trace prefix for the Python reference")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def capacities_for(scope: str, num_layers: int, num_experts: int, top_k: int) -> list[int]:
    """16 total slot counts, from top-k slots per layer (the smallest feasible) to 15/16 of all experts.

    Both scopes get the same totals, so `global` and `per-layer` runs are comparable.
    """
    import numpy as np

    del scope
    per_layer = np.linspace(top_k, num_experts * 15 // 16, NUM_CAPACITIES).round().astype(int)
    return [int(size) * num_layers for size in per_layer]


def write_oracle_general(path: Path, object_ids, steps) -> None:
    """Write libcachesim's oracleGeneral binary records: uint32 time, uint64 id, uint32 size, int64 next."""
    import numpy as np

    count = object_ids.shape[0]
    next_access = np.full(count, -1, np.int64)  # -1: never requested again
    order = np.argsort(object_ids, kind="stable")
    sorted_ids = object_ids[order]
    same_as_next = sorted_ids[:-1] == sorted_ids[1:]
    next_access[order[:-1][same_as_next]] = order[1:][same_as_next]
    records = np.zeros(count, dtype=np.dtype([("time", "<u4"), ("id", "<u8"), ("size", "<u4"), ("next", "<i8")]))
    records["time"] = steps
    records["id"] = object_ids + 1  # libcachesim treats id 0 as invalid in some readers
    records["size"] = 1
    records["next"] = next_access
    records.tofile(path)


def run_libcachesim(requests, scope: str, capacities: list[int], num_experts: int, workdir: Path) -> tuple[int, float]:
    """Run LRU, FIFO and Belady at every capacity; return (accesses processed, seconds in process_trace)."""
    import libcachesim
    import numpy as np

    experts = requests.experts
    num_passes, num_layers, _ = experts.shape
    streams = []
    if scope == "per-layer":
        for layer in range(num_layers):
            layer_experts = experts[:, layer, :]
            used = layer_experts >= 0
            ids = layer_experts[used].astype(np.uint64)
            steps = np.broadcast_to(np.arange(num_passes)[:, None], layer_experts.shape)[used].astype(np.uint32)
            path = workdir / f"layer{layer}.oracleGeneral.bin"
            write_oracle_general(path, ids, steps)
            streams.append((path, ids.shape[0], lambda capacity: capacity // num_layers))
    else:
        flat = experts + (np.arange(num_layers) * num_experts)[None, :, None]
        used = experts >= 0
        ids = flat[used].astype(np.uint64)
        steps = np.broadcast_to(np.arange(num_passes * num_layers).reshape(num_passes, num_layers, 1), experts.shape)[used]
        path = workdir / "global.oracleGeneral.bin"
        write_oracle_general(path, ids, steps.astype(np.uint32))
        streams.append((path, ids.shape[0], lambda capacity: capacity))

    accesses, seconds = 0, 0.0
    for name in LIBCACHESIM_NAMES.values():
        for capacity in capacities:
            for path, count, pool_slots in streams:
                reader = libcachesim.TraceReader(str(path), libcachesim.TraceType.ORACLE_GENERAL_TRACE)
                cache = getattr(libcachesim, name)(pool_slots(capacity))
                start = time.perf_counter()
                cache.process_trace(reader)
                seconds += time.perf_counter() - start
                accesses += count
    return accesses, seconds


def main() -> int:
    args = parse_args()
    if args.devices > 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}").strip()
    import jax

    from specmd_jax.sim import SimConfig, build_requests, run_sweep
    from specmd_jax.traces.synthetic import load_synthetic

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import reference_sim

    trace = load_synthetic(f"synthetic:olmoe-1b-7b?passes={args.tokens}&prompt=0&seed={args.seed}")
    requests = build_requests(trace)
    total_accesses = int(requests.counts.sum())
    capacities = capacities_for(args.scope, trace.num_layers, trace.num_experts, trace.top_k)
    configs = [SimConfig(policy, capacity) for policy in POLICIES for capacity in capacities]
    print(f"machine: {os.cpu_count()} CPU cores, jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} device(s)")
    print(f"trace: {trace.name}, {trace.num_passes} passes x {trace.num_layers} layers, {total_accesses} expert accesses")
    print(f"sweep: {len(POLICIES)} policies x {len(capacities)} capacities ({args.scope} scope), slots {capacities[0]}..{capacities[-1]}")

    # The jitted sweep: the first run compiles, the second is timed.
    start = time.perf_counter()
    run_sweep(requests, configs, scope=args.scope, num_experts=trace.num_experts)
    first = time.perf_counter() - start
    jax_seconds_by_policy = {}
    results = []
    for policy in POLICIES:
        group = [config for config in configs if config.policy == policy]
        start = time.perf_counter()
        results += run_sweep(requests, group, scope=args.scope, num_experts=trace.num_experts)
        jax_seconds_by_policy[policy] = time.perf_counter() - start
    jax_seconds = sum(jax_seconds_by_policy.values())
    jax_rate = len(configs) * total_accesses / jax_seconds
    comparable = [policy for policy in POLICIES if policy in LIBCACHESIM_NAMES]
    jax_comparable_rate = len(comparable) * len(capacities) * total_accesses / sum(jax_seconds_by_policy[p] for p in comparable)

    with tempfile.TemporaryDirectory() as workdir:
        lcs_accesses, lcs_seconds = run_libcachesim(requests, args.scope, capacities, trace.num_experts, Path(workdir))
    lcs_rate = lcs_accesses / lcs_seconds

    # The plain-Python reference on a prefix, 2 capacities per policy.
    prefix = trace_prefix(trace, args.reference_passes)
    prefix_accesses = int(build_requests(prefix).counts.sum())
    start = time.perf_counter()
    reference_runs = 0
    for policy in POLICIES:
        for capacity in (capacities[0], capacities[len(capacities) // 2]):
            reference_sim.simulate(prefix, policy, capacity, args.scope)
            reference_runs += 1
    reference_rate = reference_runs * prefix_accesses / (time.perf_counter() - start)

    print()
    print(f"{'implementation':<34} {'config-accesses/s':>18}")
    print(f"{'jax sweep, 4 policies x 16':<34} {jax_rate:>18.3g}")
    print(f"{'jax sweep, LRU+FIFO+Belady only':<34} {jax_comparable_rate:>18.3g}")
    print(f"{'libcachesim, LRU+FIFO+Belady':<34} {lcs_rate:>18.3g}")
    print(f"{'python reference (prefix)':<34} {reference_rate:>18.3g}")
    print()
    print("jax seconds per policy group (16 capacities each): " + ", ".join(f"{p} {s:.2f}" for p, s in jax_seconds_by_policy.items()))
    print(f"jax first run (compile + run) {first:.1f} s, timed run {jax_seconds:.1f} s; libcachesim {lcs_seconds:.1f} s")
    hit_rates = {(r.config.policy, r.config.capacity): r.hit_rate for r in results}
    middle = capacities[len(capacities) // 2]
    print("hit rate at " + f"{middle} slots: " + ", ".join(f"{p} {hit_rates[(p, middle)]:.4f}" for p in POLICIES))
    print(f"speedup_vs_libcachesim={jax_rate / lcs_rate:.2f}")
    return 0


def trace_prefix(trace, num_passes: int):
    """Return a new trace made of the first `num_passes` passes of `trace`."""
    from specmd_jax.traces import make_trace

    num_passes = min(num_passes, trace.num_passes)
    end = int(trace.pass_offsets[num_passes])
    return make_trace(
        trace.expert_ids[:end], trace.metadata,
        missing=trace.missing[:end], pass_offsets=trace.pass_offsets[: num_passes + 1],
        pass_kind=trace.pass_kind[:num_passes], pass_sequence=trace.pass_sequence[:num_passes],
    )


if __name__ == "__main__":
    sys.exit(main())

"""Hit-for-hit parity with libcachesim 0.3.5 on traces with one request per step.

With top_k = 1, one token per pass and `global` scope, every step requests exactly one item, so the
simulator gets a plain access stream: the flat ids (layer * E + expert) in step order. libcachesim gets the
same stream as an oracleGeneral binary trace, which carries each request's next access time for Belady.
Every object has size 1 and the cache size is the slot count, so libcachesim's byte capacity equals ours.

libcachesim can abort the whole process on some inputs, so each simulation runs in a subprocess with a
timeout. The subprocess writes its result to a JSON file, because the library logs to stdout.

LFU: our rule evicts the smallest (requests since insertion, step of last use, flat id). The comments in
libCacheSim's LFU.c (github.com/1a1a11a/libCacheSim) say that it forgets a frequency on eviction and
evicts objects of equal frequency in FIFO order. An object joins the objects of frequency f at its f-th
request, which stays its last request while its frequency is f, so that FIFO order is least recently used
first. The two tie rules therefore agree when every step has one request, and test_lfu_ties_match_libcachesim
checks them on a stream with many equal counts.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from specmd_jax.sim import SimConfig, run_sweep
from specmd_jax.traces.trace import Trace, TraceMetadata, make_trace

pytest.importorskip("libcachesim")

LIBCACHESIM_CLASSES = {"lru": "LRU", "fifo": "FIFO", "lfu": "LFU", "belady": "Belady"}
CAPACITIES = (1, 2, 3, 5, 8, 13)
NUM_LAYERS, NUM_EXPERTS, NUM_PASSES = 2, 10, 500
SUBPROCESS_TIMEOUT_S = 120

# One oracleGeneral record: uint32 clock time, uint64 object id, uint32 object size, int64 virtual time
# of the object's next request (the 1-based index of that request in the trace), -1 if there is none.
# The layout is checked against libcachesim's own converter below.
ORACLE_GENERAL_RECORD = struct.Struct("<IQIq")
# What libcachesim 0.3.5's reader returns as next_access_vtime for a record that stores -1.
READER_NO_NEXT_ACCESS = 2**63 - 1

# Script for a fresh interpreter that simulates one cache over an oracleGeneral trace and writes, per
# request, the fields that the reader decoded and whether the request hit.
RUNNER = textwrap.dedent(
    """
    import json, sys
    import libcachesim

    class_name, cache_size, trace_path, output_path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    reader = libcachesim.TraceReader(trace_path, libcachesim.TraceType.ORACLE_GENERAL_TRACE)
    cache = getattr(libcachesim, class_name)(cache_size)
    records, hits = [], []
    for request in reader:
        records.append([request.clock_time, request.obj_id, request.obj_size, request.next_access_vtime])
        hits.append(bool(cache.get(request)))
    with open(output_path, "w") as handle:
        json.dump({"records": records, "hits": hits}, handle)
    """
)

# Script for a fresh interpreter that converts a CSV trace (time, id, size) with libcachesim's converter.
CONVERTER = textwrap.dedent(
    """
    import sys
    import libcachesim

    csv_path, output_path = sys.argv[1], sys.argv[2]
    params = libcachesim.ReaderInitParam(has_header=True, has_header_set=True, delimiter=",")
    params.time_field, params.obj_id_field, params.obj_size_field = 1, 2, 3
    reader = libcachesim.TraceReader(csv_path, libcachesim.TraceType.CSV_TRACE, params)
    libcachesim.Util.convert_to_oracleGeneral(reader._reader, output_path)
    """
)


def single_request_trace(seed: int, num_passes: int = NUM_PASSES, skew: float = 0.9) -> Trace:
    """Build a top-1 trace of one-token decode passes, so every step has one request.

    Expert popularity follows 1 / rank**skew within each layer; skew 0 is uniform routing.
    """
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, NUM_EXPERTS + 1) ** skew
    expert_ids = np.empty((num_passes, NUM_LAYERS, 1), np.int64)
    for layer in range(NUM_LAYERS):
        layer_weights = weights[rng.permutation(NUM_EXPERTS)]
        expert_ids[:, layer, 0] = rng.choice(NUM_EXPERTS, num_passes, p=layer_weights / layer_weights.sum())
    metadata = TraceMetadata("libcachesim-parity", NUM_LAYERS, NUM_EXPERTS, 1, f"single_request_trace(seed={seed})", synthetic=True)
    return make_trace(expert_ids, metadata)


def request_stream(trace: Trace) -> list[int]:
    """Return the flat ids in step order (pass-major, then layer)."""
    return [layer * trace.num_experts + int(trace.expert_ids[p, layer, 0]) for p in range(trace.num_passes) for layer in range(trace.num_layers)]


def next_access_times(stream: list[int]) -> list[int]:
    """Return, per request, the 1-based index of the same object's next request, or -1."""
    following = [-1] * len(stream)
    next_index: dict[int, int] = {}
    for index in range(len(stream) - 1, -1, -1):
        following[index] = next_index.get(stream[index], -1)
        next_index[stream[index]] = index + 1
    return following


def write_oracle_general(path, stream: list[int]) -> None:
    """Write the stream as oracleGeneral records with clock time = index + 1 and size 1."""
    with open(path, "wb") as handle:
        for index, (object_id, next_access) in enumerate(zip(stream, next_access_times(stream))):
            handle.write(ORACLE_GENERAL_RECORD.pack(index + 1, object_id, 1, next_access))


def run_python(code: str, *args: str, description: str) -> None:
    try:
        completed = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{description} timed out after {SUBPROCESS_TIMEOUT_S} s")
    if completed.returncode != 0:
        pytest.fail(f"{description} failed with exit code {completed.returncode}: {completed.stderr[-2000:]}")


def run_libcachesim(policy: str, capacity: int, trace_path, output_path) -> dict:
    class_name = LIBCACHESIM_CLASSES[policy]
    run_python(RUNNER, class_name, str(capacity), str(trace_path), str(output_path), description=f"libcachesim {class_name} with cache size {capacity}")
    with open(output_path) as handle:
        return json.load(handle)


def our_hits(trace: Trace, policy: str) -> dict[int, np.ndarray]:
    """Return, per capacity, whether each request of the stream hit in the jitted simulator."""
    configs = [SimConfig(policy, capacity) for capacity in CAPACITIES]
    results, events = run_sweep(trace, configs, scope="global", record_events=True)
    hits = {}
    for config, result in zip(configs, results):
        outcomes = events[config].outcomes
        assert outcomes.shape == (trace.num_passes, trace.num_layers, 1)
        hits[config.capacity] = outcomes[:, :, 0].reshape(-1) == 1
        assert result.hits == int(hits[config.capacity].sum())
    return hits


def test_oracle_general_layout_matches_converter(tmp_path):
    stream = request_stream(single_request_trace(seed=7, num_passes=40))
    csv_path = tmp_path / "stream.csv"
    with open(csv_path, "w") as handle:
        handle.write("time,id,size\n")
        for index, object_id in enumerate(stream):
            handle.write(f"{index + 1},{object_id},1\n")
    converted_path = tmp_path / "converted.oracleGeneral"
    run_python(CONVERTER, str(csv_path), str(converted_path), description="libcachesim convert_to_oracleGeneral")

    ours_path = tmp_path / "ours.oracleGeneral"
    write_oracle_general(ours_path, stream)
    assert ours_path.read_bytes() == converted_path.read_bytes()


def check_hits_match(policy: str, trace: Trace, tmp_path) -> None:
    stream = request_stream(trace)
    trace_path = tmp_path / "stream.oracleGeneral"
    write_oracle_general(trace_path, stream)
    expected_next = [value if value >= 0 else READER_NO_NEXT_ACCESS for value in next_access_times(stream)]
    hits = our_hits(trace, policy)

    for capacity in CAPACITIES:
        result = run_libcachesim(policy, capacity, trace_path, tmp_path / f"result-{capacity}.json")
        records = np.asarray(result["records"], dtype=np.int64)
        # The reader must decode exactly what was written, or Belady would see wrong next accesses.
        assert len(records) == len(stream), f"cache size {capacity}: libcachesim read {len(records)} of {len(stream)} requests"
        assert records[:, 0].tolist() == list(range(1, len(stream) + 1)), "clock times read back"
        assert records[:, 1].tolist() == stream, "object ids read back"
        assert set(records[:, 2].tolist()) == {1}, "object sizes read back"
        assert [row[3] for row in result["records"]] == expected_next, "next access times read back"

        theirs = np.asarray(result["hits"], dtype=bool)
        ours = hits[capacity]
        assert int(ours.sum()) == int(theirs.sum()), f"{policy} cache size {capacity}: hit count"
        if not np.array_equal(ours, theirs):
            first = int(np.argmax(ours != theirs))
            pytest.fail(
                f"{policy} cache size {capacity}: request {first} (object {stream[first]}) is a "
                f"{'hit' if ours[first] else 'miss'} here but a {'hit' if theirs[first] else 'miss'} in libcachesim"
            )


@pytest.mark.parametrize("policy", sorted(LIBCACHESIM_CLASSES))
def test_hits_match_libcachesim(policy, tmp_path):
    check_hits_match(policy, single_request_trace(seed=0), tmp_path)


def test_lfu_ties_match_libcachesim(tmp_path):
    # Uniform routing over few experts leaves many items with equal request counts at every eviction.
    check_hits_match("lfu", single_request_trace(seed=1, skew=0.0), tmp_path)

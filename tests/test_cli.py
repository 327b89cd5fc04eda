"""The `specmd-jax` command line: simulate, traces stats and traces convert."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from specmd_jax.cli import main
from specmd_jax.report import CSV_COLUMNS
from specmd_jax.traces import load_trace
from specmd_jax.traces.flame import load_flame_npz


def test_simulate_flame_writes_table_and_csv(flame_npz, tmp_path, capsys) -> None:
    out = tmp_path / "results.csv"
    code = main([
        "simulate", "--trace", str(flame_npz), "--policies", "lru,least-stale",
        "--capacities", "0.1,3,0.5", "--scope", "global", "--out", str(out), "--quiet",
    ])
    printed = capsys.readouterr().out
    assert code == 0
    assert "skipped capacity 3: a capacity of 3 slots is smaller than the 6 distinct experts" in printed
    rows = list(csv.DictReader(out.open()))
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    # 2 policies x 2 feasible capacities; 0.1 of 8 x 64 experts = floor(51.2 + 0.5) = 51 slots.
    assert [(row["policy"], int(row["capacity_experts"])) for row in rows] == [
        ("lru", 51), ("lru", 256), ("least-stale", 51), ("least-stale", 256),
    ]
    for row in rows:
        requests = int(row["requests"])
        misses = int(row["compulsory_misses"]) + int(row["capacity_misses"]) + int(row["collision_misses"])
        assert requests == 2048 * 8 * 6  # one decode pass per token, 6 distinct experts per step
        assert int(row["hits"]) + misses == requests
        assert float(row["hit_rate"]) <= float(row["belady_hit_rate"])
        assert len(row["hit_rate_per_layer"].split(";")) == 8


def test_simulate_mixtral_reports_missing_cells(mixtral_jsonl, capsys) -> None:
    code = main(["simulate", "--trace", str(mixtral_jsonl), "--policies", "lru", "--capacities", "64", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "missing cells 37" in printed
    assert "lru" in printed
    assert "belady_bound" in printed


def test_simulate_synthetic_says_synthetic(capsys) -> None:
    code = main(["simulate", "--trace", "synthetic:mixtral-8x7b?passes=50", "--policies", "fifo", "--capacities", "0.5", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "synthetic" in printed.splitlines()[0]


def test_simulate_unknown_policy_fails(capsys) -> None:
    code = main(["simulate", "--trace", "synthetic:mixtral-8x7b?passes=5", "--policies", "lru,mru", "--quiet"])
    assert code == 2
    assert "unknown eviction policy 'mru'" in capsys.readouterr().err


def test_simulate_bad_capacity_fails(capsys) -> None:
    code = main(["simulate", "--trace", "synthetic:mixtral-8x7b?passes=5", "--capacities", "1.5", "--quiet"])
    assert code == 2
    assert "invalid capacity '1.5'" in capsys.readouterr().err


def test_simulate_param_sweep(capsys) -> None:
    code = main([
        "simulate", "--trace", "synthetic:mixtral-8x7b?passes=60", "--policies", "s3fifo",
        "--param", "s3fifo.small_fraction=0.1,0.3", "--capacities", "0.5", "--quiet",
    ])
    printed = capsys.readouterr().out
    assert code == 0
    assert "s3fifo(small_fraction=0.1)" in printed
    assert "s3fifo(small_fraction=0.3)" in printed


def test_simulate_missing_trace_file_fails(tmp_path, capsys) -> None:
    code = main(["simulate", "--trace", str(tmp_path / "absent.npz"), "--quiet"])
    assert code == 2
    assert "absent.npz" in capsys.readouterr().err


def test_traces_stats_and_convert(flame_npz, tmp_path, capsys) -> None:
    assert main(["traces", "stats", str(flame_npz)]) == 0
    assert "flame-moe-290m" in capsys.readouterr().out
    out = tmp_path / "flame.npz"
    assert main(["traces", "convert", str(flame_npz), str(out)]) == 0
    converted = load_trace(out)
    original = load_flame_npz(flame_npz)
    np.testing.assert_array_equal(converted.expert_ids, original.expert_ids)
    np.testing.assert_array_equal(converted.scores, original.scores)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--policies", ""], "invalid --policies '': expected at least one comma-separated value"),
        (["--capacities", " , "], "invalid --capacities ' , ': expected at least one comma-separated value"),
        (["--policies", "lru,lru"], "invalid --policies 'lru,lru': lru listed more than once"),
        (["--seeds", "a"], "invalid --seeds value 'a': expected an integer"),
        (["--policies", "random", "--seeds", "99999999999"], "SimConfig.seed: expected an integer in [0, 2147483647], got 99999999999"),
        (["--policies", "s3fifo", "--param", "s3fifo.small_fraction=-1"], "s3fifo: invalid small_fraction -1"),
        (["--policies", "s3fifo", "--param", "s3fifo.promote_threshold=0.5"], "s3fifo: invalid promote_threshold 0.5"),
    ],
)
def test_simulate_rejects_bad_options(arguments, message, capsys) -> None:
    defaults = [] if "--capacities" in arguments else ["--capacities", "0.5"]
    code = main(["simulate", "--trace", "synthetic:mixtral-8x7b?passes=5", "--quiet", *defaults, *arguments])
    assert code == 2
    assert message in capsys.readouterr().err


def test_simulate_out_is_directory_fails_before_running(tmp_path, capsys) -> None:
    code = main(["simulate", "--trace", "synthetic:mixtral-8x7b?passes=5", "--out", str(tmp_path), "--quiet"])
    assert code == 2
    assert f"invalid --out '{tmp_path}': it is a directory" in capsys.readouterr().err


def test_simulate_unroll_zero_rejected(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["simulate", "--unroll", "0"])
    assert "expected an integer >= 1, got 0" in capsys.readouterr().err


def test_simulate_per_layer_shows_used_slots(flame_npz, tmp_path, capsys) -> None:
    out = tmp_path / "results.csv"
    code = main(["simulate", "--trace", str(flame_npz), "--policies", "fifo", "--capacities", "0.1,7",
                 "--scope", "per-layer", "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    # 0.1 of 512 experts = 51 slots; per layer floor(51 / 8) = 6, so 48 slots are simulated.
    row = next(csv.DictReader(out.open()))
    assert (row["capacity_experts"], row["capacity_effective"]) == ("51", "48")
    assert "a capacity of 7 slots gives 0 slots per layer in per-layer scope, fewer than the 6" in printed


def test_simulate_with_timing(mixtral_jsonl, tmp_path, capsys) -> None:
    out = tmp_path / "timed.csv"
    code = main(["simulate", "--trace", str(mixtral_jsonl), "--policies", "lru", "--capacities", "0.25,1.0",
                 "--hardware", "pcie4-a100", "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "timing note: the trace has no prefill pass" in printed
    rows = list(csv.DictReader(out.open()))
    assert [row["model_shape"] for row in rows] == ["mixtral-8x7b", "mixtral-8x7b"]
    quarter, full = (float(row["tpot_s"]) for row in rows)
    resident = float(rows[0]["all_resident_tpot_s"])
    no_cache = float(rows[0]["no_cache_tpot_s"])
    # More slots, fewer transfers: all-resident <= full cache <= quarter cache <= no cache.
    assert resident <= full <= quarter <= no_cache
    assert float(rows[0]["belady_tpot_s"]) <= quarter
    assert rows[0]["ttft_s"] == ""


def test_simulate_model_without_hardware_fails(capsys) -> None:
    code = main(["simulate", "--trace", "synthetic:mixtral-8x7b?passes=5", "--model", "mixtral-8x7b", "--quiet"])
    assert code == 2
    assert "give --hardware too" in capsys.readouterr().err


def test_simulate_timing_model_mismatch_fails(mixtral_jsonl, capsys) -> None:
    code = main(["simulate", "--trace", str(mixtral_jsonl), "--hardware", "tpu-v5e", "--model", "olmoe-1b-7b", "--quiet"])
    assert code == 2
    assert "has 32 MoE layers but model shape 'olmoe-1b-7b' has 16" in capsys.readouterr().err

"""Prefetching through the public entry points: run_sweep identities, run_study's bound, and the CLI."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from specmd_jax.cli import main
from specmd_jax.policies import policy_names
from specmd_jax.prefetch.registry import PrefetchConfig
from specmd_jax.report import CSV_COLUMNS
from specmd_jax.sim import SimConfig, run_sweep
from specmd_jax.study import run_study
from specmd_jax.traces.synthetic import load_synthetic

SMALL_TRACE = "synthetic:mixtral-8x7b?passes=60&seed=3"


@pytest.fixture(scope="module")
def small_trace():
    return load_synthetic(SMALL_TRACE)


def test_zero_budget_equals_no_prefetch(small_trace):
    """The prefetch scan with a zero budget must reproduce the plain scan for every policy."""
    plain = [SimConfig(policy, 40) for policy in policy_names()]
    idle = [SimConfig(policy, 40, prefetch=PrefetchConfig("oracle", budget=0)) for policy in policy_names()]
    plain_results = run_sweep(small_trace, plain, fast_paths=False)
    idle_results = run_sweep(small_trace, idle)
    for config, expected, got in zip(idle, plain_results, idle_results):
        assert got.hits == expected.hits, config.policy
        assert got.collision_misses == expected.collision_misses, config.policy
        assert got.evictions == expected.evictions, config.policy
        assert got.prefetches == 0, config.policy


def test_oracle_prefetch_leaves_only_first_misses(small_trace):
    """With no budget limit and a cache larger than two steps, oracle prefetching misses only at step 0."""
    config = SimConfig("lru", 64, prefetch=PrefetchConfig("oracle"))
    (result,) = run_sweep(small_trace, [config])
    first_step_requests = len(np.unique(small_trace.expert_ids[: small_trace.pass_offsets[1], 0]))
    assert result.misses == first_step_requests
    assert result.prefetch_hits == result.prefetches
    assert result.wasted_prefetches == 0
    assert result.prefetch_precision == 1.0


def test_host_misses_never_insert(small_trace):
    (result,) = run_sweep(small_trace, [SimConfig("lru", 40, miss="host")])
    assert result.hits == 0
    assert result.evictions == 0


def test_study_rows_have_bound(small_trace):
    prefetchers = [None, PrefetchConfig("oracle", budget=2), PrefetchConfig("co-occurrence", top_k=2)]
    rows, skipped = run_study(small_trace, ["lru", "least-stale"], ["0.1", "0.25"], prefetchers=prefetchers)
    assert not skipped
    assert len(rows) == 2 * 3 * 2
    for row in rows:
        assert row.bound is not None
        assert row.bound.config.policy == "belady"
        assert row.bound.config.prefetch == PrefetchConfig("oracle")
        assert row.result.hit_rate <= row.bound.hit_rate + 1e-12, row.result.config
    labels = [(row.result.config.policy, row.prefetcher) for row in rows[:6]]
    assert labels == [("lru", "none")] * 2 + [("lru", "oracle(budget=2)")] * 2 + [("lru", "co-occurrence(k=2)")] * 2


def test_per_layer_scope_rejects_prefetch(small_trace):
    with pytest.raises(ValueError, match="global scope only"):
        run_study(small_trace, ["lru"], ["0.5"], scope="per-layer", prefetchers=[PrefetchConfig("oracle")])
    with pytest.raises(ValueError, match="global scope only"):
        run_sweep(small_trace, [SimConfig("lru", 256, prefetch=PrefetchConfig("oracle"))], scope="per-layer")


def test_learned_needs_table(small_trace):
    with pytest.raises(ValueError, match="needs a score table"):
        run_sweep(small_trace, [SimConfig("lru", 40, prefetch=PrefetchConfig("learned"))])


def test_supplied_table_checked(small_trace):
    table = np.zeros((small_trace.num_passes, small_trace.num_layers, 1, small_trace.num_experts), np.float32)
    table[3, 2, 0, 1] = -1.0
    with pytest.raises(ValueError, match=r"expected finite scores in \[0, 3.4e\+38\] \(float32\), got -1.0 at index \(3, 2, 0, 1\)"):
        run_sweep(small_trace, [SimConfig("lru", 40, prefetch=PrefetchConfig("learned"))], score_tables={"learned": table})
    with pytest.raises(ValueError, match="expected shape"):
        run_sweep(small_trace, [SimConfig("lru", 40, prefetch=PrefetchConfig("learned"))], score_tables={"learned": table[:, :3]})


def test_gate_speculative_without_logits(small_trace):
    with pytest.raises(ValueError, match="speculative"):
        run_sweep(small_trace, [SimConfig("lru", 40, prefetch=PrefetchConfig("gate-speculative"))])


@pytest.mark.parametrize(
    "field, value, message",
    [("lookahead", 0, "lookahead"), ("budget", -1, "budget"), ("threshold", 1.5, "threshold"), ("top_k", 0, "top_k")],
)
def test_prefetch_config_checks(field, value, message):
    with pytest.raises(ValueError, match=message):
        PrefetchConfig("oracle", **{field: value})


def test_cli_prefetch_table_csv_plot(tmp_path, capsys):
    out, plot = tmp_path / "rows.csv", tmp_path / "plot.png"
    code = main([
        "simulate", "--trace", SMALL_TRACE, "--policies", "lru,belady", "--prefetch", "none,oracle,score",
        "--threshold", "0.5,0.9", "--capacities", "0.1,0.25", "--out", str(out), "--plot", str(plot), "--quiet",
    ])
    printed = capsys.readouterr().out
    assert code == 0
    assert "bound: hit rate of oracle prefetching with Belady eviction" in printed
    assert "score(mass=0.5)" in printed
    rows = list(csv.DictReader(out.open()))
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    # 2 policies x (none, oracle, score at 2 thresholds) x 2 capacities.
    assert len(rows) == 2 * 4 * 2
    oracle_rows = [row for row in rows if row["prefetcher"] == "oracle"]
    assert all(float(row["prefetch_precision"]) == 1.0 for row in oracle_rows)
    none_rows = [row for row in rows if row["prefetcher"] == "none"]
    assert all(row["prefetch_precision"] == "" and int(row["prefetches"]) == 0 for row in none_rows)
    assert all(float(row["hit_rate"]) <= float(row["bound_hit_rate"]) for row in rows)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "options, message",
    [
        (["--prefetch", "psychic"], "invalid --prefetch 'psychic'"),
        (["--prefetch", "oracle", "--scope", "per-layer"], "--prefetch is simulated in global scope only"),
        (["--prefetch", "score", "--threshold", "1.5"], "invalid --threshold value '1.5'"),
        (["--prefetch", "oracle", "--budget", "-2"], "invalid --budget value '-2'"),
        (["--prefetch", "oracle", "--lookahead", "x"], "invalid --lookahead value 'x'"),
        (["--prefetch", "oracle", "--lookahead", "40"], "invalid --lookahead 40: expected 1 to 32"),
        (["--prefetch", "oracle", "--top-k", "3"], "--top-k sets the experts per target layer"),
        (["--prefetch", "co-occurrence", "--top-k", "9"], "invalid --top-k 9: expected at most 8"),
        (["--prefetch", "oracle", "--threshold", "0.5"], "--threshold sets the probability mass"),
        (["--lookahead", "2"], "--lookahead and --budget set prefetchers"),
        (["--prefetch", "oracle", "--train-fraction", "2"], "invalid --train-fraction 2.0"),
        (["--prefetch", "oracle", "--plot", "out.jpg"], "expected a file name ending in .png"),
        (["--miss", "substitute", "--scope", "per-layer"], "--miss substitute is simulated in global scope only"),
        (["--miss", "substitute"], "has no router logits"),
    ],
)
def test_cli_prefetch_errors(options, message, capsys):
    code = main(["simulate", "--trace", "synthetic:mixtral-8x7b?passes=8", "--policies", "lru", "--capacities", "0.5", "--quiet", *options])
    assert code == 2
    assert message in capsys.readouterr().err


def test_default_budget_is_unlimited(small_trace):
    """No budget and a budget above lookahead x E give the same run: every candidate is prefetched."""
    configs = [
        SimConfig("lru", 40, prefetch=PrefetchConfig("score", threshold=0.99)),
        SimConfig("lru", 40, prefetch=PrefetchConfig("score", threshold=0.99, budget=10_000)),
        SimConfig("lru", 40, prefetch=PrefetchConfig("score", threshold=0.99, budget=2)),
    ]
    unlimited, large, small = run_sweep(small_trace, configs)
    assert unlimited.prefetches == large.prefetches
    assert unlimited.hits == large.hits
    assert small.prefetches < unlimited.prefetches


def test_score_tables_must_be_mapping(small_trace):
    table = np.zeros((small_trace.num_passes, small_trace.num_layers, 1, small_trace.num_experts), np.float32)
    config = SimConfig("lru", 40, prefetch=PrefetchConfig("learned"))
    with pytest.raises(ValueError, match="expected a mapping from prefetcher names"):
        run_sweep(small_trace, [config], score_tables=table)
    with pytest.raises(ValueError, match=r"unknown prefetcher names \['learn'\]"):
        run_sweep(small_trace, [config], score_tables={"learn": table})
    with pytest.raises(ValueError, match="expected a numpy array of real numbers, got dtype complex64"):
        run_sweep(small_trace, [config], score_tables={"learned": table.astype(np.complex64)})
    huge = table.astype(np.float64)
    huge[0, 0, 0, 0] = 1e300
    with pytest.raises(ValueError, match=r"got 1e\+300 at index \(0, 0, 0, 0\)"):
        run_sweep(small_trace, [config], score_tables={"learned": huge})

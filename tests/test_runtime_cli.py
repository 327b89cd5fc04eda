"""Tests of `specmd-jax generate` on a small saved model: outputs, replays and bad arguments."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from specmd_jax.cli import main
from specmd_jax.model import ModelConfig, MoeTransformer, greedy_generate
from specmd_jax.model.orbax_io import checkpoint_manager, save_step
from specmd_jax.predictor.model import PredictorConfig
from specmd_jax.predictor.predict import predict_scores
from specmd_jax.predictor.train import TrainConfig, train_predictor
from specmd_jax.prefetch.registry import PrefetchConfig
from specmd_jax.record import ByteTokenizer
from specmd_jax.sim.sweep import SimConfig, run_sweep
from specmd_jax.traces.trace import TraceMetadata, load_trace, make_trace

CONFIG = ModelConfig(
    name="cli-test", vocab_size=256, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8,
    num_experts=8, top_k=2, expert_hidden_size=8, max_seq_len=64,
)
PROMPT_TEXT = "offload!"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run directory with the model, a prompt file, and the resident model's tokens for it."""
    folder = tmp_path_factory.mktemp("generate")
    model = MoeTransformer(CONFIG, rngs=nnx.Rngs(5))
    save_step(checkpoint_manager(folder / "run"), 1, model)
    prompt = folder / "prompt.txt"
    prompt.write_text(PROMPT_TEXT, encoding="utf-8")
    tokens = ByteTokenizer().encode(PROMPT_TEXT)[None, :]
    expected = greedy_generate(model, tokens, 3).tokens[0].tolist()
    return folder, expected


def generate(saved, *extra: str) -> int:
    folder, _ = saved
    return main(["generate", "--checkpoint", str(folder / "run"), "--prompt", str(folder / "prompt.txt"), "--gen-tokens", "3", *extra])


def test_generate_reports_and_matches_resident(saved, capsys):
    folder, expected = saved
    out = folder / "free.json"
    assert generate(saved, "--capacity", "10", "--policy", "lru", "--json", str(out), "--no-warmup") == 0
    printed = capsys.readouterr().out
    for word in ("TTFT", "TPOT", "bytes moved", "hit rate"):
        assert word in printed
    result = json.loads(out.read_text())
    assert result["tokens"] == expected
    assert result["capacity"] == 10
    assert result["bytes_moved"] == result["transfers"] * 3 * 16 * 8 * 4
    assert 0.0 <= result["hit_rate"] <= 1.0
    assert "modelled" not in result


def test_generate_compares_with_timing_model(saved, capsys):
    folder, expected = saved
    out = folder / "emulated.json"
    assert generate(saved, "--capacity", "0.7", "--link-bandwidth", "0.001", "--json", str(out)) == 0
    printed = capsys.readouterr().out
    assert "measured" in printed
    assert "modelled" in printed
    result = json.loads(out.read_text())
    assert result["tokens"] == expected
    assert result["capacity"] == 11
    assert set(result["modelled"]) == {"ttft", "tpot", "stall"}
    # At 1 MB/s each 1,536-byte expert takes 1.5 ms on the link, and both sides count every transfer.
    link_seconds = result["transfers"] * 1536 / 1e6
    assert result["modelled"]["stall"] == pytest.approx(link_seconds)
    assert result["stall_s"] + result["transfer_overhead_s"] >= 0.9 * link_seconds


def test_generate_replay_belady_and_oracle(saved, capsys):
    folder, expected = saved
    trace_path = folder / "run.npz"
    assert generate(saved, "--capacity", "10", "--policy", "fifo", "--save-trace", str(trace_path), "--no-warmup") == 0
    trace = load_trace(trace_path)
    assert trace.num_passes == 3
    out = folder / "replay.json"
    assert generate(
        saved, "--capacity", "10", "--policy", "belady", "--prefetch", "oracle", "--replay", str(trace_path),
        "--json", str(out), "--no-warmup",
    ) == 0
    result = json.loads(out.read_text())
    assert result["tokens"] == expected
    assert result["prefetch"] == "oracle"


# Replays run 8 passes at 9 slots, because on the 3 passes of `generate` the co-occurrence and score
# prefetchers of these tests propose only experts that are already resident.
REPLAY_RUN = ("--gen-tokens", "8", "--capacity", "9", "--no-warmup")


@pytest.fixture(scope="module")
def recorded(saved):
    """The routing of an 8-token LRU run of the saved model, written by --save-trace, and its tokens."""
    folder, expected = saved
    path, out = folder / "recorded.npz", folder / "recorded.json"
    assert generate(saved, *REPLAY_RUN, "--policy", "lru", "--save-trace", str(path), "--json", str(out)) == 0
    tokens = json.loads(out.read_text())["tokens"]
    assert tokens[:3] == expected
    return path, tokens


def replay(saved, recorded, out, *extra: str) -> dict:
    """Replay the recorded trace with the given options and return the JSON results."""
    assert generate(saved, *REPLAY_RUN, "--replay", str(recorded[0]), "--json", str(out), *extra) == 0
    result = json.loads(out.read_text())
    assert result["tokens"] == recorded[1]
    return result


def simulated(recorded, policy: str, prefetch: PrefetchConfig, **options):
    (result,) = run_sweep(load_trace(recorded[0]), [SimConfig(policy, 9, prefetch=prefetch)], **options)
    assert result.prefetches > 0, "the case should prefetch, or it checks only the demand phase"
    return result


def test_generate_replay_registry_prefetcher(saved, recorded, tmp_path, capsys):
    result = replay(
        saved, recorded, tmp_path / "co-occurrence.json", "--policy", "least-stale", "--prefetch", "co-occurrence",
        "--prefetch-top-k", "3", "--prefetch-lookahead", "2", "--prefetch-budget", "4", "--train-fraction", "0.5",
    )
    assert result["prefetch"] == "co-occurrence"
    assert "prefetch co-occurrence(k=3,d=2,budget=4);" in capsys.readouterr().out
    prefetch = PrefetchConfig("co-occurrence", lookahead=2, top_k=3, budget=4)
    reference = simulated(recorded, "least-stale", prefetch, train_fraction=0.5)
    assert (result["requests"], result["hits"], result["prefetches"]) == (reference.requests, reference.hits, reference.prefetches)


def test_generate_replay_score_threshold(saved, recorded, tmp_path):
    result = replay(
        saved, recorded, tmp_path / "score.json", "--policy", "lru", "--prefetch", "score", "--prefetch-threshold", "0.6",
        "--train-fraction", "0.5",
    )
    reference = simulated(recorded, "lru", PrefetchConfig("score", threshold=0.6), train_fraction=0.5)
    assert (result["hits"], result["prefetches"]) == (reference.hits, reference.prefetches)


def patterned_trace(num_layers: int, num_experts: int, num_passes: int = 48):
    """A decode trace in which layer l + 1 routes to layer l's two experts shifted by one."""
    generator = np.random.default_rng(0)
    ids = np.zeros((num_passes, num_layers, 2), np.int16)
    for token in range(num_passes):
        first = generator.choice(num_experts, size=2, replace=False)
        for layer in range(num_layers):
            ids[token, layer] = (first + layer) % num_experts
    return make_trace(ids, TraceMetadata("patterned", num_layers, num_experts, 2, "patterned.npz"))


def test_generate_replay_learned_predictor(saved, recorded, tmp_path):
    run_dir = tmp_path / "predictor"
    config = PredictorConfig(CONFIG.num_moe_layers, CONFIG.num_experts, lookahead=1, window=1, feature_source="presence")
    train_predictor(patterned_trace(CONFIG.num_moe_layers, CONFIG.num_experts), run_dir, config, TrainConfig(epochs=1, batch_size=8))
    result = replay(saved, recorded, tmp_path / "learned.json", "--policy", "lru", "--prefetch", "learned", "--predictor", str(run_dir))

    table = predict_scores(run_dir, load_trace(recorded[0]), 1)
    reference = simulated(recorded, "lru", PrefetchConfig("learned"), score_tables={"learned": table})
    assert (result["hits"], result["prefetches"]) == (reference.hits, reference.prefetches)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--policy", "belady"], "belady needs the future requests"),
        (["--prefetch", "oracle"], "--prefetch oracle builds its score table from a recorded trace"),
        (["--prefetch", "co-occurrence"], "--prefetch co-occurrence builds its score table from a recorded trace"),
        (["--prefetch", "learned", "--replay", "absent.npz"], "--prefetch learned needs --predictor DIR"),
        (["--predictor", "run"], "--predictor sets the score table of the 'learned' prefetcher, but --prefetch is none"),
        (["--prefetch", "gate", "--prefetch-top-k", "0"], "invalid --prefetch-top-k 0"),
        (["--prefetch", "oracle", "--replay", "absent.npz", "--prefetch-top-k", "2"], "--prefetch oracle does not use it"),
        (["--prefetch", "score", "--replay", "absent.npz", "--prefetch-threshold", "1.5"], "invalid --prefetch-threshold 1.5"),
        (["--prefetch", "top-k", "--replay", "absent.npz", "--prefetch-threshold", "0.5"], "but --prefetch is top-k"),
        (["--train-fraction", "1"], "invalid --train-fraction 1.0: expected a number in (0, 1)"),
        (["--prefetch", "gate", "--prefetch-lookahead", "2"], "invalid --prefetch-lookahead 2: gate"),
        (["--prefetch", "oracle", "--replay", "absent.npz", "--prefetch-lookahead", "0"], "invalid --prefetch-lookahead 0"),
        (["--device", "9"], "invalid --device 9"),
        (["--link-bandwidth", "0"], "invalid --link-bandwidth"),
        (["--link-latency", "5"], "give --link-bandwidth too"),
        (["--capacity", "1"], "smaller than the"),
        (["--capacity", "0"], "invalid capacity"),
        (["--gen-tokens", "0"], "invalid --gen-tokens 0"),
        (["--prompt-tokens", "100"], "fewer than --prompt-tokens 100"),
    ],
)
def test_generate_rejects_bad_arguments(saved, capsys, extra, message):
    assert generate(saved, "--no-warmup", *extra) == 2
    assert message in capsys.readouterr().err


def test_generate_rejects_missing_prompt(saved, capsys, tmp_path):
    folder, _ = saved
    code = main(["generate", "--checkpoint", str(folder / "run"), "--prompt", str(tmp_path / "absent.txt")])
    assert code == 2
    assert "prompt file not found" in capsys.readouterr().err


def test_generate_output_is_deterministic(saved):
    folder, expected = saved
    outputs = []
    for name in ("first", "second"):
        path = folder / f"{name}.json"
        assert generate(saved, "--capacity", "9", "--policy", "random", "--seed", "3", "--json", str(path), "--no-warmup") == 0
        outputs.append(json.loads(path.read_text()))
    assert outputs[0]["tokens"] == outputs[1]["tokens"] == expected
    assert outputs[0]["hits"] == outputs[1]["hits"]
    assert np.isfinite(outputs[0]["ttft_s"])

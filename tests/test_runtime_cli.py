"""Tests of `specmd-jax generate` on a small saved model: outputs, replays and bad arguments."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from specmd_jax.cli import main
from specmd_jax.model import ModelConfig, MoeTransformer, greedy_generate
from specmd_jax.model.orbax_io import checkpoint_manager, save_step
from specmd_jax.record import ByteTokenizer
from specmd_jax.traces.trace import load_trace

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


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--policy", "belady"], "belady needs the future requests"),
        (["--prefetch", "oracle"], "oracle loads the true future requests"),
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

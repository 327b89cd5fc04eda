"""Tests of trace recording: layout, speculative logits, the CLI functions, and simulation of the result."""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from specmd_jax.model import ModelConfig, MoeTransformer
from specmd_jax.record import (
    ByteTokenizer, add_record_parser, record_trace, split_prompts,
)
from specmd_jax.sim.sweep import CapacityError, SimConfig, check_capacity, run_sweep
from specmd_jax.sim.requests import build_requests
from specmd_jax.traces.trace import PASS_DECODE, PASS_PREFILL, load_trace, save_trace

CONFIG = ModelConfig(
    name="record-test", vocab_size=256, hidden_size=32, num_layers=4, num_heads=2, num_kv_heads=2, head_dim=16,
    num_experts=8, top_k=2, expert_hidden_size=16, dense_layers=(0,), dense_hidden_size=32, max_seq_len=64,
)
PROMPT, GEN = 12, 5


@pytest.fixture(scope="module")
def model() -> MoeTransformer:
    return MoeTransformer(CONFIG, rngs=nnx.Rngs(7))


@pytest.fixture(scope="module")
def recorded(model):
    tokens = ByteTokenizer().encode("Routing traces record which experts each token selects. " * 3)
    prompts = split_prompts(tokens, PROMPT, 2)
    return record_trace(model, prompts, GEN, model_name="record-test", source="test")


def test_trace_layout(recorded):
    trace = recorded.trace
    assert trace.num_tokens == 2 * (PROMPT + GEN)
    assert trace.num_passes == 2 * (1 + GEN)
    assert trace.pass_kind.tolist() == ([PASS_PREFILL] + [PASS_DECODE] * GEN) * 2
    assert trace.pass_sequence.tolist() == [0] * (1 + GEN) + [1] * (1 + GEN)
    assert np.diff(trace.pass_offsets).tolist() == ([PROMPT] + [1] * GEN) * 2
    assert trace.metadata.num_layers == 3
    assert trace.metadata.layer_ids == (1, 2, 3)
    assert trace.router_logits.shape == (trace.num_tokens, 3, 8)


def test_trace_matches_uncached_forward(model, recorded):
    # The first sequence's tokens are the prompt and the fed generated tokens. One uncached pass
    # over them must route exactly like the prefill + decode passes with the KV cache.
    tokens = ByteTokenizer().encode("Routing traces record which experts each token selects. ")[:PROMPT]
    sequence = np.concatenate([tokens, recorded.generated[0]])
    routing = model.forward(jnp.asarray(sequence)[None], record=True).routing
    first = slice(0, PROMPT + GEN)
    np.testing.assert_array_equal(recorded.trace.expert_ids[first], np.asarray(routing.expert_ids[0]))
    np.testing.assert_allclose(recorded.trace.router_logits[first], np.asarray(routing.router_logits[0]), atol=1e-5)
    np.testing.assert_allclose(recorded.trace.scores[first], np.asarray(routing.probs[0]), atol=1e-6)


def test_speculative_logits(model, recorded):
    speculative = recorded.speculative_logits
    trace = recorded.trace
    assert speculative.shape == (trace.num_tokens, 3, 8)
    assert speculative.dtype == np.float32
    assert np.isnan(speculative[:, -1]).all()
    assert np.isfinite(speculative[:, :-1]).all()

    # Layer l's speculative logits = router of MoE layer l + 1 applied to layer l's router input.
    tokens = jnp.asarray(ByteTokenizer().encode("Routing traces record which experts each token selects. ")[:PROMPT])
    routing = model.forward(tokens[None], record=True, record_hidden=True).routing
    blocks = model.moe_blocks()
    for layer in range(2):
        expected = blocks[layer + 1].router_logits(routing.hidden[0, :, layer])
        np.testing.assert_allclose(speculative[:PROMPT, layer], np.asarray(expected), atol=1e-5)


def test_saved_trace_loads_and_simulates(tmp_path, recorded):
    out = tmp_path / "trace.npz"
    save_trace(recorded.trace, out)
    trace = load_trace(out)
    np.testing.assert_array_equal(trace.expert_ids, recorded.trace.expert_ids)
    np.testing.assert_array_equal(trace.router_logits, recorded.trace.router_logits)
    np.testing.assert_array_equal(trace.speculative_logits, recorded.speculative_logits)

    requests = build_requests(trace)
    configs = []
    for slots in (24, 12, 6):
        try:
            check_capacity(slots, "global", requests)
        except CapacityError:
            continue
        configs += [SimConfig("lru", slots), SimConfig("fifo", slots)]
    assert configs, "no feasible capacity for the recorded trace"
    results = run_sweep(trace, configs, scope="global")
    for result in results:
        assert result.requests > 0
        assert 0.0 <= result.hit_rate <= 1.0
    full = [r for r in results if r.config.capacity == 24]
    if full:
        assert all(r.capacity_misses == 0 for r in full)


def test_split_prompts_rejects_short_text():
    with pytest.raises(ValueError, match="fewer than 3 prompts x 10 tokens = 30"):
        split_prompts(np.arange(20), 10, 3)


def build_cli() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specmd-jax")
    add_record_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_record_preset(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("An expert cache holds the experts a decoder will need next. " * 4, encoding="utf-8")
    out = tmp_path / "cli.npz"
    args = build_cli().parse_args([
        "record", "--model", "tiny-moe", "--text", str(text), "--out", str(out),
        "--prompt-tokens", "16", "--gen-tokens", "3", "--dtype", "float32", "--quiet",
    ])
    assert args.handler(args) == 0
    trace = load_trace(out)
    assert trace.num_passes == 4
    assert trace.metadata.num_experts == 64
    assert trace.speculative_logits.shape == (19, 8, 64)


def test_cli_requires_one_source(tmp_path):
    with pytest.raises(SystemExit):
        build_cli().parse_args(["record", "--text", "t.txt", "--out", "o.npz"])
    with pytest.raises(SystemExit):
        build_cli().parse_args(["record", "--model", "tiny-moe", "--checkpoint", str(tmp_path), "--text", "t", "--out", "o"])


def test_cli_missing_text(tmp_path):
    args = build_cli().parse_args(["record", "--model", "tiny-moe", "--text", str(tmp_path / "absent.txt"), "--out", "o.npz"])
    with pytest.raises(FileNotFoundError, match="absent.txt: text file not found"):
        args.handler(args)


def test_cli_record_hf_checkpoint(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="reading tokenizer.json needs the tokenizers package")
    pytest.importorskip("safetensors", reason="checkpoint import needs safetensors")
    from test_checkpoint import HF_CONFIGS, export_tensors, random_model, write_checkpoint

    directory = write_checkpoint(tmp_path / "olmoe", HF_CONFIGS["olmoe"], export_tensors(random_model("olmoe"), "olmoe"))
    words = ["[UNK]", "the", "expert", "cache", "holds", "hot", "experts", "a", "decoder", "needs"]
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    text = tmp_path / "text.txt"
    text.write_text("the expert cache holds hot experts a decoder needs " * 3, encoding="utf-8")

    out = tmp_path / "hf.npz"
    args = build_cli().parse_args([
        "record", "--checkpoint", str(directory), "--text", str(text), "--out", str(out),
        "--prompt-tokens", "9", "--gen-tokens", "2", "--sequences", "2", "--dtype", "float32", "--quiet",
    ])
    assert args.handler(args) == 0
    trace = load_trace(out)
    assert trace.num_passes == 2 * 3
    assert trace.metadata.num_experts == 4
    assert trace.metadata.layer_ids == (0, 1)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "mixtral-8x7b"], "preset 'mixtral-8x7b' needs about"),
        (["--model", "tiny-moe", "--prompt-tokens", "0"], "invalid --prompt-tokens 0: expected an integer >= 1"),
        (["--model", "tiny-moe", "--gen-tokens", "-1"], "invalid --gen-tokens -1: expected an integer >= 0"),
    ],
)
def test_cli_rejects_bad_record_input(tmp_path, extra, message, capsys):
    from specmd_jax.cli import main

    text = tmp_path / "text.txt"
    text.write_text("An expert cache. " * 20, encoding="utf-8")
    code = main(["record", "--text", str(text), "--out", str(tmp_path / "o.npz"), "--quiet", *extra])
    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_non_utf8_text(tmp_path, capsys):
    from specmd_jax.cli import main

    text = tmp_path / "latin1.txt"
    text.write_bytes(b"caf\xe9 " * 40)
    code = main(["record", "--model", "tiny-moe", "--text", str(text), "--out", str(tmp_path / "o.npz"), "--quiet"])
    assert code == 2
    assert f"{text}: not valid UTF-8 at byte 3 (e9)" in capsys.readouterr().err


def test_cli_rejects_out_directory_before_running(tmp_path, capsys):
    from specmd_jax.cli import main

    text = tmp_path / "text.txt"
    text.write_text("An expert cache. " * 20, encoding="utf-8")
    code = main(["record", "--model", "tiny-moe", "--text", str(text), "--out", str(tmp_path), "--quiet"])
    assert code == 2
    assert "it is a directory" in capsys.readouterr().err

"""Tests of the learned next-layer predictor: features, model, training, checkpoints, evaluation and CLI."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from specmd_jax.cli import main as cli_main
from specmd_jax.predictor.checkpoint import BEST, LATEST, RUN_FILE, latest_epoch, load_predictor, read_run_info
from specmd_jax.predictor.evaluate import LEARNED, evaluate_tables, ranking_metrics
from specmd_jax.predictor.features import (
    build_features,
    build_targets,
    pass_router_probabilities,
    split_passes,
)
from specmd_jax.predictor.model import NextLayerPredictor, PredictorConfig, count_parameters, predictor_cost
from specmd_jax.predictor.predict import evaluate_run, predict_scores
from specmd_jax.predictor.train import TrainConfig, train_predictor
from specmd_jax.timing.models import get_model_shape
from specmd_jax.traces.io import load_any
from specmd_jax.traces.trace import MISSING_EXPERT, PASS_DECODE, PASS_PREFILL, TraceMetadata, make_trace, save_trace

TINY_TRAIN = TrainConfig(epochs=3, batch_size=8, learning_rate=1e-2, warmup_epochs=1, seed=0)


def patterned_trace(num_passes: int = 48, num_experts: int = 8, seed: int = 0, name: str = "tiny"):
    """Build a 3-layer, top-2 decode trace in which layer l + 1 routes to layer l's experts shifted by one."""
    generator = np.random.default_rng(seed)
    ids = np.zeros((num_passes, 3, 2), dtype=np.int16)
    for token in range(num_passes):
        first = generator.choice(num_experts, size=2, replace=False)
        for layer in range(3):
            ids[token, layer] = (first + layer) % num_experts
    scores = generator.uniform(0.1, 0.5, size=ids.shape).astype(np.float32)
    return make_trace(ids, TraceMetadata(name, 3, num_experts, 2, f"{name}.npz"), scores=scores)


def params_of(model: NextLayerPredictor) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))]


# ---------------------------------------------------------------------------------------------
# Features, targets and splits


def mixed_trace():
    # Pass 0 is a prefill of tokens 0 and 1, pass 1 is token 2 (2 layers, 4 experts, top-2).
    ids = np.array([[[0, 1], [2, 3]], [[0, 2], [1, 3]], [[3, 1], [MISSING_EXPERT, MISSING_EXPERT]]])
    missing = np.zeros((3, 2), dtype=bool)
    missing[2, 1] = True
    scores = np.array([[[0.4, 0.2], [0.5, 0.1]], [[0.6, 0.2], [0.3, 0.3]], [[0.7, 0.1], [np.nan, np.nan]]], dtype=np.float32)
    logits = np.zeros((3, 2, 4), dtype=np.float32)
    logits[:, :, 0] = np.log(3.0)  # softmax [0.5, 1/6, 1/6, 1/6]
    logits[2, 1] = np.nan
    return make_trace(
        ids, TraceMetadata("mixed", 2, 4, 2, "mixed.npz"), missing=missing, pass_offsets=np.array([0, 2, 3]),
        pass_kind=np.array([PASS_PREFILL, PASS_DECODE]), scores=scores, router_logits=logits,
    )


def test_pass_probabilities_scores() -> None:
    probabilities = pass_router_probabilities(mixed_trace(), "scores")
    # Pass 0, layer 0: token 0 gives e0 0.4 and e1 0.2, token 1 gives e0 0.6 and e2 0.2, averaged over 2 tokens.
    np.testing.assert_allclose(probabilities[0, 0], [0.5, 0.1, 0.1, 0.0], rtol=1e-6)
    np.testing.assert_allclose(probabilities[0, 1], [0.0, 0.15, 0.25, 0.2], rtol=1e-6)
    np.testing.assert_allclose(probabilities[1, 0], [0.0, 0.1, 0.0, 0.7], rtol=1e-6)
    np.testing.assert_array_equal(probabilities[1, 1], 0.0)  # the pass's only cell is missing


def test_pass_probabilities_presence() -> None:
    probabilities = pass_router_probabilities(mixed_trace(), "presence")
    np.testing.assert_allclose(probabilities[0, 0], [0.5, 0.25, 0.25, 0.0], rtol=1e-6)
    np.testing.assert_allclose(probabilities[1, 0], [0.0, 0.5, 0.0, 0.5], rtol=1e-6)


def test_pass_probabilities_router_logits() -> None:
    probabilities = pass_router_probabilities(mixed_trace(), "router_logits")
    np.testing.assert_allclose(probabilities[0, 0], [0.5, 1 / 6, 1 / 6, 1 / 6], rtol=1e-6)
    np.testing.assert_array_equal(probabilities[1, 1], 0.0)


def test_features_window_layout() -> None:
    trace = mixed_trace()
    features = build_features(trace, window=2, source="scores")
    probabilities = pass_router_probabilities(trace, "scores")
    assert features.shape == (2, 2, 12)
    np.testing.assert_array_equal(features[0, 0, :4], [1, 1, 1, 0])  # requests of pass 0, layer 0
    np.testing.assert_array_equal(features[0, 0, 4:8], probabilities[0, 0])
    np.testing.assert_array_equal(features[0, 0, 8:], 0.0)  # no layer before 0
    np.testing.assert_array_equal(features[0, 1, 4:8], probabilities[0, 1])
    np.testing.assert_array_equal(features[0, 1, 8:], probabilities[0, 0])
    np.testing.assert_array_equal(features[1, 1, :4], 0.0)  # missing cell: no requests


def test_features_bad_window() -> None:
    with pytest.raises(ValueError, match=re.escape("window: expected an integer in [1, 2] (the layer count), got 3")):
        build_features(mixed_trace(), window=3, source="scores")


def test_features_missing_source() -> None:
    trace = patterned_trace()
    with pytest.raises(ValueError, match="trace tiny \\(tiny.npz\\) has no router_logits"):
        build_features(trace, window=1, source="router_logits")


def test_split_passes() -> None:
    split = split_passes(2048)
    assert (split.train_end, split.validation_end, split.num_passes) == (1306, 1536, 2048)
    small = split_passes(4, 0.75, 0.15)
    assert (small.train_end, small.validation_end) == (2, 3)


def test_split_passes_too_short() -> None:
    with pytest.raises(ValueError, match="too few to keep one for training"):
        split_passes(2, 0.75)
    with pytest.raises(ValueError, match="leaves 0 passes to train on"):
        split_passes(1, 0.75)


def test_targets_valid_before() -> None:
    targets = build_targets(patterned_trace(num_passes=4), lookahead=2)
    valid = targets.valid_before(2)
    # Steps 0 .. 5 of passes 0 and 1 (3 layers) may target steps up to 5.
    assert valid[1, 2, 0] == False  # noqa: E712  step 5 targets step 6 (pass 2)
    assert valid[1, 1, 0] == True  # noqa: E712  step 4 targets step 5
    assert valid[1, 1, 1] == False  # noqa: E712  step 4 targets step 6
    assert targets.valid[3, 2].sum() == 0  # the last step has no target


# ---------------------------------------------------------------------------------------------
# Model and cost


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="PredictorConfig.lookahead: expected at most num_layers=3, got 4"):
        PredictorConfig(3, 8, lookahead=4)
    with pytest.raises(ValueError, match="PredictorConfig.loss: expected one of softmax, sigmoid, got 'mse'"):
        PredictorConfig(3, 8, loss="mse")
    with pytest.raises(ValueError, match="x.json: field 'model': expected keys"):
        PredictorConfig.from_dict({"num_layers": 3}, "x.json")


def test_model_output_shape() -> None:
    for per_layer_heads in (True, False):
        for hidden in (0, 16):
            config = PredictorConfig(3, 8, lookahead=2, window=2, hidden=hidden, per_layer_heads=per_layer_heads)
            model = NextLayerPredictor(config, rngs=nnx.Rngs(0))
            scores = np.asarray(model.scores(np.ones((5, 3, config.num_features), np.float32)))
            assert scores.shape == (5, 3, 2, 8)
            np.testing.assert_allclose(scores.sum(axis=-1), 1.0, rtol=1e-5)


def test_parameter_count_formula() -> None:
    # Per-layer linear heads: L x F x D*E weights plus L x D*E biases.
    assert count_parameters(PredictorConfig(8, 64, lookahead=3, window=3)) == 8 * 256 * 192 + 8 * 192
    # Shared linear head: F x D*E weights plus the per-layer output bias (the layer embedding).
    assert count_parameters(PredictorConfig(8, 64, lookahead=3, window=3, per_layer_heads=False)) == 256 * 192 + 8 * 192
    # Hidden layer: F x H + H, the layer embedding L x H, then the heads.
    hidden = PredictorConfig(8, 64, lookahead=3, window=3, hidden=32)
    assert count_parameters(hidden) == 256 * 32 + 32 + 8 * 32 + 8 * 32 * 192 + 8 * 192


def test_cost_under_one_percent() -> None:
    cost = predictor_cost(PredictorConfig(8, 64), get_model_shape("flame-moe-290m"))
    # One FLAME-MoE-290M MoE layer: router 1024 x 64, 64 + 2 experts of 3 x 1024 x 704 weights.
    assert cost.moe_layer_parameters == 1024 * 64 + 66 * 3 * 1024 * 704
    assert cost.moe_layer_flops_per_token == 2 * (1024 * 64 + 8 * 3 * 1024 * 704)
    assert cost.flops_per_token == 2 * 256 * 192 + 192
    assert cost.parameter_fraction < 0.01
    assert cost.flops_fraction < 0.01


def test_cost_wrong_model() -> None:
    with pytest.raises(ValueError, match="model shape mixtral-8x7b has 32 MoE layers of 8 experts"):
        predictor_cost(PredictorConfig(8, 64), get_model_shape("mixtral-8x7b"))


# ---------------------------------------------------------------------------------------------
# Metrics


def test_ranking_metrics_hand_worked() -> None:
    scores = np.array([[0.9, 0.8, 0.1, 0.0], [0.0, 0.0, 0.0, 0.0]])
    requests = np.array([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]])
    metrics = ranking_metrics(scores, requests, k=1)
    np.testing.assert_allclose(metrics["recall@k"], [0.5, 0.0])
    np.testing.assert_allclose(metrics["precision@k"], [1.0, 0.0])
    np.testing.assert_allclose(metrics["f1@k"], [2 / 3, 0.0])
    np.testing.assert_allclose(metrics["top-1"], [1.0, 0.0])
    # Ties rank the smaller id first: row 1 takes experts 0 and 1 at 2k = 2.
    np.testing.assert_allclose(metrics["recall@2k"], [0.5, 0.5])


def test_oracle_table_scores_perfectly() -> None:
    trace = patterned_trace()
    targets = build_targets(trace, 2)
    report = evaluate_tables(trace, targets.requests, targets, first_pass=36, train_passes=36)
    learned = report.methods[LEARNED]
    np.testing.assert_allclose(learned.values["recall@k"][learned.steps > 0], 1.0)
    np.testing.assert_allclose(learned.values["top-1"][learned.steps > 0], 1.0)


# ---------------------------------------------------------------------------------------------
# Training, checkpoints and prediction


def tiny_config(trace, **changes) -> PredictorConfig:
    return PredictorConfig(trace.num_layers, trace.num_experts, lookahead=2, window=2, **changes)


def test_training_deterministic(tmp_path: Path) -> None:
    trace = patterned_trace()
    first = train_predictor(trace, tmp_path / "a", tiny_config(trace), TINY_TRAIN)
    second = train_predictor(trace, tmp_path / "b", tiny_config(trace), TINY_TRAIN)
    assert first.history == second.history
    for left, right in zip(params_of(load_predictor(tmp_path / "a", LATEST).model), params_of(load_predictor(tmp_path / "b", LATEST).model)):
        np.testing.assert_array_equal(left, right)
    other = train_predictor(trace, tmp_path / "c", tiny_config(trace), TrainConfig(**{**TINY_TRAIN.to_dict(), "seed": 1}))
    assert other.history != first.history


def test_training_learns_pattern(tmp_path: Path) -> None:
    trace = patterned_trace(num_passes=96)
    train = TrainConfig(epochs=10, batch_size=4, learning_rate=5e-2, seed=0)
    result = train_predictor(trace, tmp_path / "run", tiny_config(trace), train)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    report = evaluate_run(tmp_path / "run", trace)
    # Layer 0 -> 1 is the shift by one, fully determined by layer 0's experts.
    assert report.methods[LEARNED].values["recall@k"][0, 0] > 0.9


def test_resume_matches_uninterrupted(tmp_path: Path) -> None:
    trace = patterned_trace()
    straight = train_predictor(trace, tmp_path / "straight", tiny_config(trace), TINY_TRAIN)
    part = train_predictor(trace, tmp_path / "resumed", tiny_config(trace), TINY_TRAIN, stop_after_epoch=1)
    assert [row["epoch"] for row in part.history] == [1]
    assert latest_epoch(tmp_path / "resumed", LATEST) == 1
    rest = train_predictor(trace, tmp_path / "resumed", tiny_config(trace), TINY_TRAIN)
    assert rest.start_epoch == 2
    assert rest.history == straight.history
    assert rest.best_epoch == straight.best_epoch
    for kind in (LATEST, BEST):
        resumed = params_of(load_predictor(tmp_path / "resumed", kind).model)
        uninterrupted = params_of(load_predictor(tmp_path / "straight", kind).model)
        for left, right in zip(resumed, uninterrupted):
            np.testing.assert_array_equal(left, right)


def test_resume_other_settings(tmp_path: Path) -> None:
    trace = patterned_trace()
    train_predictor(trace, tmp_path / "run", tiny_config(trace), TINY_TRAIN, stop_after_epoch=1)
    with pytest.raises(ValueError, match=re.escape("the saved run has other 'model' settings (window: saved [2], requested [1])")):
        train_predictor(trace, tmp_path / "run", PredictorConfig(3, 8, lookahead=2, window=1), TINY_TRAIN)
    with pytest.raises(ValueError, match="other 'train' settings \\(learning_rate"):
        train_predictor(trace, tmp_path / "run", tiny_config(trace), TrainConfig(**{**TINY_TRAIN.to_dict(), "learning_rate": 0.5}))


def test_restore_and_predict(tmp_path: Path) -> None:
    trace = patterned_trace()
    result = train_predictor(trace, tmp_path / "run", tiny_config(trace), TINY_TRAIN)
    loaded = load_predictor(tmp_path / "run")
    assert loaded.epoch == result.best_epoch
    assert loaded.metadata["validation_recall"] == pytest.approx(result.best_validation_recall)
    table = predict_scores(tmp_path / "run", trace, 2)
    assert table.shape == (48, 3, 2, 8)
    assert table.dtype == np.float32
    np.testing.assert_array_equal(table, predict_scores(loaded, trace, 2))
    np.testing.assert_array_equal(table[:, :, :1], predict_scores(loaded.model, trace, 1))
    np.testing.assert_array_equal(table[-1, -1], 0.0)  # no step after the last one
    np.testing.assert_array_equal(table[-1, -2, 1], 0.0)
    np.testing.assert_allclose(table[:-1].sum(axis=-1), 1.0, rtol=1e-5)


def test_predict_mismatched_trace(tmp_path: Path) -> None:
    trace = patterned_trace()
    train_predictor(trace, tmp_path / "run", tiny_config(trace), TINY_TRAIN, stop_after_epoch=1)
    with pytest.raises(ValueError, match=re.escape("predictor has num_experts=8, but trace wide (wide.npz) has num_experts=16")):
        predict_scores(tmp_path / "run", patterned_trace(num_experts=16, name="wide"), 2)
    with pytest.raises(ValueError, match=re.escape("lookahead 3 requested, but the predictor was trained for 1 .. 2")):
        predict_scores(tmp_path / "run", trace, 3)
    deeper = make_trace(np.zeros((4, 4, 1), np.int16), TraceMetadata("deep", 4, 8, 1, "deep.npz"), scores=np.ones((4, 4, 1), np.float32))
    with pytest.raises(ValueError, match=re.escape("predictor has num_layers=3, but trace deep (deep.npz) has num_layers=4")):
        predict_scores(tmp_path / "run", deeper, 1)
    no_scores = make_trace(np.zeros((4, 3, 1), np.int16), TraceMetadata("bare", 3, 8, 1, "bare.npz"))
    with pytest.raises(ValueError, match="trace bare \\(bare.npz\\) has no scores"):
        predict_scores(tmp_path / "run", no_scores, 1)


def test_corrupt_run_file(tmp_path: Path) -> None:
    trace = patterned_trace()
    train_predictor(trace, tmp_path / "run", tiny_config(trace), TINY_TRAIN, stop_after_epoch=1)
    run_file = tmp_path / "run" / RUN_FILE
    original = run_file.read_text()

    run_file.write_text(original[: len(original) // 2])
    with pytest.raises(ValueError, match=f"{re.escape(str(run_file))}: invalid JSON"):
        load_predictor(tmp_path / "run")

    data = json.loads(original)
    data["format"] = "something-else"
    run_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="field 'format': expected 'specmd-jax-predictor', got 'something-else'"):
        read_run_info(tmp_path / "run")

    run_file.unlink()
    with pytest.raises(FileNotFoundError, match="file not found; expected a run directory written by train-predictor"):
        load_predictor(tmp_path / "run")


def test_run_file_other_shape(tmp_path: Path) -> None:
    trace = patterned_trace()
    train_predictor(trace, tmp_path / "run", tiny_config(trace), TINY_TRAIN, stop_after_epoch=1)
    run_file = tmp_path / "run" / RUN_FILE
    data = json.loads(run_file.read_text())
    data["model"]["num_experts"] = 16
    run_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="the checkpoint was saved for another predictor configuration|do not match the model"):
        load_predictor(tmp_path / "run")


def test_corrupt_checkpoint_arrays(tmp_path: Path) -> None:
    trace = patterned_trace()
    train_predictor(trace, tmp_path / "run", tiny_config(trace), TINY_TRAIN, stop_after_epoch=1)
    params_dir = tmp_path / "run" / BEST / "1" / "params"
    for path in params_dir.rglob("*"):
        if path.is_file() and path.name not in ("commit_success.txt",):
            path.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'run' / BEST}: cannot restore epoch 1")):
        load_predictor(tmp_path / "run")


def test_missing_checkpoint(tmp_path: Path) -> None:
    trace = patterned_trace()
    train_predictor(trace, tmp_path / "run", tiny_config(trace), TINY_TRAIN, stop_after_epoch=1)
    shutil.rmtree(tmp_path / "run" / BEST)
    with pytest.raises(FileNotFoundError, match="no saved checkpoint found"):
        load_predictor(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="predictor run directory not found"):
        load_predictor(tmp_path / "absent")


# ---------------------------------------------------------------------------------------------
# Command line and the real trace


def test_cli_train_and_eval(tmp_path: Path, capsys) -> None:
    trace_path = tmp_path / "tiny.npz"
    save_trace(patterned_trace(), trace_path)
    run = tmp_path / "run"
    code = cli_main([
        "train-predictor", "--trace", str(trace_path), "--out", str(run), "--epochs", "2", "--lookahead", "2",
        "--window", "2", "--batch-size", "8", "--quiet",
    ])
    output = capsys.readouterr().out
    assert code == 0
    assert "model: per-layer heads, linear, lookahead 2, window 2, features from scores, softmax loss" in output
    assert "no model-shape preset to compare with" in output
    assert "recall@k per layer pair" in output
    assert "0->1 " in output
    assert "2->0 (next pass)" in output

    code = cli_main(["eval-predictor", "--trace", str(trace_path), "--checkpoint", str(run)])
    output = capsys.readouterr().out
    assert code == 0
    assert "checkpoint: " in output
    assert "co-occurrence" in output
    assert "learned beats the best baseline at" in output


def test_cli_eval_mismatched_trace(tmp_path: Path, capsys) -> None:
    trace_path = tmp_path / "tiny.npz"
    save_trace(patterned_trace(), trace_path)
    wide_path = tmp_path / "wide.npz"
    save_trace(patterned_trace(num_experts=16, name="wide"), wide_path)
    run = tmp_path / "run"
    assert cli_main(["train-predictor", "--trace", str(trace_path), "--out", str(run), "--epochs", "1", "--lookahead", "2", "--quiet"]) == 0
    capsys.readouterr()
    code = cli_main(["eval-predictor", "--trace", str(wide_path), "--checkpoint", str(run)])
    error = capsys.readouterr().err
    assert code == 2
    assert "predictor has num_experts=8, but trace wide" in error


def test_cli_eval_corrupt_checkpoint(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / RUN_FILE).write_text("{not json")
    trace_path = tmp_path / "tiny.npz"
    save_trace(patterned_trace(), trace_path)
    code = cli_main(["eval-predictor", "--trace", str(trace_path), "--checkpoint", str(run)])
    assert code == 2
    assert "invalid JSON" in capsys.readouterr().err


def test_flame_short_run(tmp_path: Path, flame_npz: Path) -> None:
    trace = load_any(str(flame_npz))
    config = PredictorConfig(8, 64, lookahead=3, window=3)
    result = train_predictor(trace, tmp_path / "run", config, TrainConfig(epochs=2, batch_size=64))
    assert len(result.history) == 2
    info = read_run_info(tmp_path / "run")
    assert (info.split.train_end, info.split.validation_end) == (1306, 1536)
    report = evaluate_run(tmp_path / "run", trace)
    assert report.first_pass == 1536
    assert set(report.methods) == {LEARNED, "current-layer", "co-occurrence", "frequency", "previous-pass"}
    learned = report.methods[LEARNED]
    assert learned.steps[0, 0] == 512
    assert learned.steps[7, 2] == 511  # the last pass has no next pass
    assert np.isfinite(learned.values["recall@k"]).all()


def test_evaluation_includes_gate_speculative() -> None:
    trace = patterned_trace()
    # Speculative logits that single out the next layer's experts make gate-speculative exact at j = 1.
    speculative = np.zeros((48, 3, 8), dtype=np.float32)
    for layer in range(2):
        np.put_along_axis(speculative[:, layer], trace.expert_ids[:, layer + 1].astype(np.int64), 5.0, axis=-1)
    speculative[:, -1] = np.nan
    trace = make_trace(trace.expert_ids, trace.metadata, scores=trace.scores, speculative_logits=speculative)
    targets = build_targets(trace, 2)
    report = evaluate_tables(trace, targets.requests, targets, first_pass=36, train_passes=36)
    gate = report.methods["gate-speculative"].values["recall@k"]
    np.testing.assert_allclose(gate[0, 0], 1.0)
    np.testing.assert_allclose(gate[1, 0], 1.0)
    assert gate[0, 1] < 1.0  # offset 2 has no speculative row

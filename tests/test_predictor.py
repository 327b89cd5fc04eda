"""Tests of the learned next-layer predictor: features, model, training, checkpoints, evaluation and CLI."""

from __future__ import annotations

import gc
import json
import logging
import re
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from specmd_jax.cli import main as cli_main
from specmd_jax.predictor.checkpoint import (
    BEST,
    LATEST,
    RUN_FILE,
    latest_epoch,
    load_predictor,
    read_run_info,
    restore_checkpoint,
    save_checkpoint,
)
from specmd_jax.predictor.evaluate import LEARNED, evaluate_tables, format_report, ranking_metrics
from specmd_jax.predictor.features import (
    build_features,
    build_targets,
    pass_router_probabilities,
    split_passes,
)
from specmd_jax.predictor.model import ConfigValueError, NextLayerPredictor, PredictorConfig, count_parameters, predictor_cost
from specmd_jax.predictor.predict import evaluate_run, predict_scores
from specmd_jax.predictor.train import TrainConfig, make_optimizer, train_predictor
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
    with pytest.raises(ValueError, match=re.escape("PredictorConfig.lookahead: expected at most num_layers=3 (the MoE layer count), got 4")):
        PredictorConfig(3, 8, lookahead=4)
    with pytest.raises(ValueError, match="PredictorConfig.loss: expected one of softmax, sigmoid, got 'mse'"):
        PredictorConfig(3, 8, loss="mse")
    with pytest.raises(ValueError, match="x.json: field 'model': expected keys"):
        PredictorConfig.from_dict({"num_layers": 3}, "x.json")
    with pytest.raises(ValueError, match=re.escape("x.json: field 'model.window': expected an integer >= 1, got 0")):
        PredictorConfig.from_dict({"num_layers": 3, "num_experts": 8, "window": 0}, "x.json")


def test_config_errors_name_field() -> None:
    with pytest.raises(ConfigValueError) as raised:
        TrainConfig(learning_rate=float("inf"))
    assert (raised.value.owner, raised.value.field) == ("TrainConfig", "learning_rate")
    assert str(raised.value) == "TrainConfig.learning_rate: expected a finite number >= 0, got inf"
    with pytest.raises(ConfigValueError, match=re.escape("TrainConfig.train_fraction: expected a number in (0, 1), got 1.5")):
        TrainConfig(train_fraction=1.5)
    with pytest.raises(ConfigValueError, match=re.escape("TrainConfig.validation_fraction: expected a number in (0, 1), got 0")):
        TrainConfig(validation_fraction=0)
    with pytest.raises(ConfigValueError) as raised:
        PredictorConfig(3, 8, window=0)
    assert (raised.value.owner, raised.value.field, raised.value.detail) == ("PredictorConfig", "window", "expected an integer >= 1, got 0")


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


def assert_same_params(left: Path, right: Path, kind: str) -> None:
    for left_array, right_array in zip(params_of(load_predictor(left, kind).model), params_of(load_predictor(right, kind).model), strict=True):
        np.testing.assert_array_equal(left_array, right_array)


def test_resume_best_ahead_of_latest(tmp_path: Path) -> None:
    # Earlier versions of train_predictor saved best/ before latest/. Stopped while saving latest/ of
    # epoch 3, they left best/3 complete, latest/2 complete, and latest/3 as an Orbax temporary folder.
    trace = patterned_trace()
    straight = train_predictor(trace, tmp_path / "straight", tiny_config(trace), TINY_TRAIN)
    assert straight.best_epoch == 3  # otherwise epoch 3 would not have been saved to best/
    run = tmp_path / "interrupted"
    train_predictor(trace, run, tiny_config(trace), TINY_TRAIN, stop_after_epoch=2)
    model, _, _, _ = restore_checkpoint(run, LATEST, tiny_config(trace))
    save_checkpoint(run, BEST, 3, nnx.state(model, nnx.Param), {"epoch": 3, "validation_recall": 0.5})
    leftover = run / LATEST / "3.orbax-checkpoint-tmp"
    leftover.mkdir()
    (leftover / "_CHECKPOINT_METADATA").write_text('{"item_handlers": null, "commit_timestamp_nsecs": null}')
    assert sorted(path.name for path in (run / BEST).iterdir()) == ["3"]

    resumed = train_predictor(trace, run, tiny_config(trace), TINY_TRAIN)
    assert resumed.start_epoch == 3
    assert resumed.history == straight.history
    assert resumed.best_epoch == 3
    assert not leftover.exists()
    assert sorted(path.name for path in (run / LATEST).iterdir()) == ["3"]
    assert sorted(path.name for path in (run / BEST).iterdir()) == ["3"]
    assert_same_params(run, tmp_path / "straight", BEST)
    assert_same_params(run, tmp_path / "straight", LATEST)


def test_resume_best_behind_latest(tmp_path: Path) -> None:
    # Stopped after latest/3 was saved and before best/3: latest/3 names epoch 3 as the best.
    trace = patterned_trace()
    straight = train_predictor(trace, tmp_path / "straight", tiny_config(trace), TINY_TRAIN)
    assert straight.best_epoch == 3
    run = tmp_path / "interrupted"
    train_predictor(trace, run, tiny_config(trace), TINY_TRAIN, stop_after_epoch=2)
    shutil.rmtree(run / LATEST / "2")
    shutil.copytree(tmp_path / "straight" / LATEST / "3", run / LATEST / "3")
    assert load_predictor(run, BEST).epoch == 2

    resumed = train_predictor(trace, run, tiny_config(trace), TINY_TRAIN)
    assert resumed.start_epoch == 4  # nothing left to train
    assert resumed.best_epoch == 3
    assert load_predictor(run, BEST).epoch == 3
    assert_same_params(run, tmp_path / "straight", BEST)


def test_resume_best_lost(tmp_path: Path, caplog) -> None:
    # latest/2 names epoch 1 as the best, but best/ no longer has it: best/ restarts from epoch 2.
    trace = patterned_trace()
    run = tmp_path / "run"
    part = train_predictor(trace, run, tiny_config(trace), TINY_TRAIN, stop_after_epoch=2)
    params = nnx.state(NextLayerPredictor(tiny_config(trace), rngs=nnx.Rngs(0)), nnx.Param)
    template = make_optimizer(TINY_TRAIN, steps_per_epoch=1).init(params)  # the step count does not change its structure
    model, opt_state, metadata, _ = restore_checkpoint(run, LATEST, tiny_config(trace), opt_state_template=template)
    metadata.update(best_epoch=1, best_validation_recall=0.99)
    save_checkpoint(run, LATEST, 2, nnx.state(model, nnx.Param), metadata, opt_state=opt_state)
    shutil.rmtree(run / BEST)

    with caplog.at_level(logging.WARNING, logger="specmd_jax.predictor.train"):
        resumed = train_predictor(trace, run, tiny_config(trace), TINY_TRAIN, stop_after_epoch=2)
    assert "best/ has no checkpoint of the best epoch 1 (validation recall@k 0.9900); keeping epoch 2" in caplog.text
    assert resumed.best_epoch == 2
    assert resumed.best_validation_recall == pytest.approx(part.history[1]["validation_recall"])
    loaded = load_predictor(run, BEST)
    assert loaded.epoch == 2
    assert loaded.metadata["validation_recall"] == pytest.approx(part.history[1]["validation_recall"])


def test_train_into_foreign_directory(tmp_path: Path) -> None:
    trace = patterned_trace()
    run = tmp_path / "run"
    train_predictor(trace, run, tiny_config(trace), TINY_TRAIN, stop_after_epoch=1)
    (run / RUN_FILE).unlink()
    with pytest.raises(ValueError, match=re.escape(f"{run}: contains latest/ checkpoints but no predictor.json")):
        train_predictor(trace, run, tiny_config(trace), TINY_TRAIN)


def test_train_out_is_file(tmp_path: Path) -> None:
    trace = patterned_trace()
    existing = tmp_path / "taken"
    existing.write_text("not a directory")
    message = f"expected a directory or a path that does not exist yet, but {existing} is an existing file; choose another path"
    with pytest.raises(ValueError, match=re.escape(f"run directory {existing}: {message}")):
        train_predictor(trace, existing, tiny_config(trace), TINY_TRAIN)
    with pytest.raises(ValueError, match=re.escape(f"run directory {existing / 'run'}: {message}")):
        train_predictor(trace, existing / "run", tiny_config(trace), TINY_TRAIN)
    assert existing.read_text() == "not a directory"


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


def test_run_file_edited_window(tmp_path: Path) -> None:
    trace = patterned_trace()
    train_predictor(trace, tmp_path / "run", tiny_config(trace), TINY_TRAIN, stop_after_epoch=1)
    run_file = tmp_path / "run" / RUN_FILE
    data = json.loads(run_file.read_text())
    data["model"]["window"] = 1
    run_file.write_text(json.dumps(data))
    with pytest.raises(ValueError) as raised:
        load_predictor(tmp_path / "run")
    # 8 experts: the saved heads take (2 + 1) * 8 = 24 features, a window of 1 takes (1 + 1) * 8 = 16.
    assert str(raised.value) == (
        f"{tmp_path / 'run' / BEST / '1' / 'params'}: array head_kernel has shape (3, 24, 16), but the model in "
        f"predictor.json needs (3, 16, 16); predictor.json was edited or belongs to another run. Undo the edit, "
        f"or train a new run"
    )


def test_run_file_edited_hidden(tmp_path: Path) -> None:
    trace = patterned_trace()
    train_predictor(trace, tmp_path / "run", tiny_config(trace), TINY_TRAIN, stop_after_epoch=1)
    run_file = tmp_path / "run" / RUN_FILE
    data = json.loads(run_file.read_text())
    data["model"]["hidden"] = 4
    run_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(
        "saved arrays ['head_bias', 'head_kernel'], but the model in predictor.json has arrays "
        "['head_bias', 'head_kernel', 'hidden.bias', 'hidden.kernel', 'layer_embedding']"
    )):
        load_predictor(tmp_path / "run")


def test_run_file_inconsistent(tmp_path: Path) -> None:
    trace = patterned_trace()
    train_predictor(trace, tmp_path / "run", tiny_config(trace), TINY_TRAIN, stop_after_epoch=1)
    run_file = tmp_path / "run" / RUN_FILE
    original = json.loads(run_file.read_text())
    edits = [
        (("model", "num_experts", 16), "field 'model.num_experts' is 16, but field 'trace.num_experts' is 8"),
        (("model", "num_layers", 2), "field 'model.num_layers' is 2, but field 'trace.num_layers' is 3"),
        (("split", "num_passes", 40), "field 'split.num_passes' is 40, but field 'trace.num_passes' is 48"),
        (("trace", "top_k", 0), "field 'trace.top_k': expected an integer >= 1, got 0"),
        (("train", "train_fraction", None), "field 'train.train_fraction': expected a number in (0, 1), got None"),
    ]
    for (section, field, value), message in edits:
        data = json.loads(json.dumps(original))
        data[section][field] = value
        run_file.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=re.escape(f"{run_file}: {message}")):
            load_predictor(tmp_path / "run")


def corrupt_params(run: Path, kind: str, epoch: int) -> None:
    """Cut every data blob of the saved parameters to 10 bytes, as an interrupted copy would."""
    blobs = [path for path in (run / kind / str(epoch) / "params").rglob("*") if path.is_file() and path.parent.name == "d"]
    assert blobs, "the checkpoint layout changed: no params/**/d/ blob found"
    for path in blobs:
        path.write_bytes(path.read_bytes()[:10])


def test_corrupt_checkpoint_arrays(tmp_path: Path) -> None:
    trace = patterned_trace()
    train_predictor(trace, tmp_path / "run", tiny_config(trace), TINY_TRAIN, stop_after_epoch=1)
    corrupt_params(tmp_path / "run", BEST, 1)
    folder = tmp_path / "run" / BEST / "1"
    with pytest.raises(ValueError) as raised:
        load_predictor(tmp_path / "run")
    message = str(raised.value)
    assert message.startswith(f"{folder}: cannot read ")
    assert message.endswith(f"the checkpoint is incomplete or corrupt. Delete {folder} and run train-predictor again with the same options")
    assert "tensorstore_spec" not in message
    assert "\n" not in message


def test_corrupt_checkpoint_no_stray_reports(tmp_path: Path, monkeypatch) -> None:
    trace = patterned_trace()
    train_predictor(trace, tmp_path / "run", tiny_config(trace), TINY_TRAIN, stop_after_epoch=1)
    corrupt_params(tmp_path / "run", BEST, 1)
    reports = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: reports.append(repr(unraisable.exc_value)))
    # Without the filter in checkpoint.py, Orbax 0.12.8 left "Event loop is closed" reports after about
    # every other failed read.
    for _ in range(8):
        with pytest.raises(ValueError, match="cannot read"):
            load_predictor(tmp_path / "run")
        time.sleep(0.05)
        gc.collect()
    time.sleep(0.5)
    gc.collect()
    assert reports == []


def test_load_skips_incomplete_epoch(tmp_path: Path, caplog) -> None:
    trace = patterned_trace()
    train_predictor(trace, tmp_path / "run", tiny_config(trace), TINY_TRAIN, stop_after_epoch=2)
    empty = tmp_path / "run" / BEST / "3"
    empty.mkdir()
    with caplog.at_level(logging.WARNING, logger="specmd_jax.predictor.checkpoint"):
        loaded = load_predictor(tmp_path / "run")
    assert loaded.epoch == 2
    assert f"{empty}: skipped, it is not a complete checkpoint (missing item folders: params, metadata)" in caplog.text
    assert latest_epoch(tmp_path / "run", BEST) == 2

    with pytest.raises(ValueError, match=re.escape(f"{empty}: incomplete checkpoint (missing item folders: params, metadata); delete this folder")):
        train_predictor(trace, tmp_path / "run", tiny_config(trace), TINY_TRAIN)
    empty.rmdir()
    assert train_predictor(trace, tmp_path / "run", tiny_config(trace), TINY_TRAIN).start_epoch == 3


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


def test_cli_eval_edited_window(tmp_path: Path, capsys) -> None:
    trace_path = tmp_path / "tiny.npz"
    save_trace(patterned_trace(), trace_path)
    run = tmp_path / "run"
    train = ["train-predictor", "--trace", str(trace_path), "--out", str(run), "--epochs", "1", "--lookahead", "2", "--quiet"]
    assert cli_main(train) == 0
    capsys.readouterr()
    data = json.loads((run / RUN_FILE).read_text())
    data["model"]["window"] = 1
    (run / RUN_FILE).write_text(json.dumps(data))
    code = cli_main(["eval-predictor", "--trace", str(trace_path), "--checkpoint", str(run)])
    error = capsys.readouterr().err
    assert code == 2
    assert error.count("\n") == 1  # the one error line and nothing after it
    assert "array head_kernel has shape (3, 32, 16), but the model in predictor.json needs (3, 16, 16)" in error
    assert "strict=False" not in error


def test_cli_options_in_errors(tmp_path: Path, capsys) -> None:
    trace_path = tmp_path / "tiny.npz"
    save_trace(patterned_trace(), trace_path)
    cases = [
        (["--lookahead", "4"], "--lookahead: expected at most num_layers=3 (the MoE layer count), got 4"),
        (["--window", "5"], "--window: expected at most num_layers=3 (the MoE layer count), got 5"),
        (["--learning-rate", "-1"], "--learning-rate: expected a finite number >= 0, got -1.0"),
        (["--weight-decay", "nan"], "--weight-decay: expected a finite number >= 0, got nan"),
        (["--epochs", "2", "--warmup-epochs", "3"], "--warmup-epochs: expected at most epochs=2, got 3"),
        (["--train-fraction", "1.5"], "--train-fraction: expected a number in (0, 1), got 1.5"),
        (["--validation-fraction", "0"], "--validation-fraction: expected a number in (0, 1), got 0.0"),
        (["--train-fraction", "0.01"], "--train-fraction 0.01, --validation-fraction 0.15: train_fraction=0.01 of 48 passes leaves 0 passes"),
    ]
    for options, message in cases:
        code = cli_main(["train-predictor", "--trace", str(trace_path), "--out", str(tmp_path / "run"), "--quiet", *options])
        error = capsys.readouterr().err
        assert code == 2, options
        assert f"specmd-jax: error: {message}" in error
        assert "Config." not in error
    assert not (tmp_path / "run").exists()


def test_cli_out_is_file(tmp_path: Path, capsys) -> None:
    trace_path = tmp_path / "tiny.npz"
    save_trace(patterned_trace(), trace_path)
    code = cli_main(["train-predictor", "--trace", str(trace_path), "--out", str(trace_path), "--quiet"])
    output = capsys.readouterr()
    assert code == 2
    assert output.err == (
        f"specmd-jax: error: run directory {trace_path}: expected a directory or a path that does not exist yet, but "
        f"{trace_path} is an existing file; choose another path\n"
    )
    assert output.out == ""  # rejected before the trace is loaded


def test_report_pair_order() -> None:
    # 4 layers and lookahead 3: 1->0 targets the next pass, so it comes after every pair within a pass, 2->3 included.
    generator = np.random.default_rng(0)
    ids = np.stack([generator.choice(8, size=(4, 2), replace=False) for _ in range(24)]).astype(np.int16)
    trace = make_trace(ids, TraceMetadata("four", 4, 8, 2, "four.npz"), scores=np.ones(ids.shape, np.float32))
    targets = build_targets(trace, 3)
    report = evaluate_tables(trace, targets.requests, targets, first_pass=18, train_passes=18)
    lines = format_report(report).splitlines()
    first = lines.index(next(line for line in lines if line.startswith("pair ")))
    labels = [line[:20].strip() for line in lines[first + 1:first + 13]]
    assert labels == [
        "0->1", "0->2", "0->3", "1->2", "1->3", "2->3",
        "1->0 (next pass)", "2->0 (next pass)", "2->1 (next pass)", "3->0 (next pass)", "3->1 (next pass)", "3->2 (next pass)",
    ]


def test_docs_python_imports() -> None:
    # Every `from specmd_jax... import ...` line in the docs must run, and predict_scores must be among them.
    docs = Path(__file__).resolve().parent.parent / "docs" / "predictor.md"
    statements = re.findall(r"from specmd_jax[\w.]* import [\w, ]+", docs.read_text())
    assert any("predict_scores" in statement for statement in statements)
    for statement in statements:
        exec(statement, {})


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

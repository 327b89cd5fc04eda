"""Score tables of a trained predictor, in the format of `specmd_jax.prefetch.sources`."""

from __future__ import annotations

import os

import numpy as np

from specmd_jax.predictor.checkpoint import LoadedPredictor, check_trace_compatible, load_predictor
from specmd_jax.predictor.evaluate import EvaluationReport, evaluate_tables
from specmd_jax.predictor.features import build_features, build_targets, check_feature_source, split_passes
from specmd_jax.predictor.model import NextLayerPredictor
from specmd_jax.predictor.train import predict_passes
from specmd_jax.prefetch.sources import DEFAULT_MAX_BYTES, check_lookahead, check_table_size, clear_past_last_step
from specmd_jax.traces.trace import Trace


def predict_scores(
    predictor: str | os.PathLike | LoadedPredictor | NextLayerPredictor,
    trace: Trace,
    lookahead: int,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> np.ndarray:
    """Return the learned predictor's float32 [T, L, D, E] score table of `trace`, with D = lookahead.

    `predictor` is a run directory (its `best/` checkpoint is loaded), a `LoadedPredictor` or a model.
    Every pass gets a row, training passes included. Only the passes from the run's split
    `validation_end` on (the test passes, when `trace` is the training trace) were held out from both
    training and model selection. Scores are softmax probabilities over the experts of each target
    step (or per-expert sigmoids for a model trained with the sigmoid loss), and targets past the last
    step score 0.
    """
    if isinstance(predictor, (str, os.PathLike)):
        origin = str(predictor)
        model = load_predictor(predictor).model
    elif isinstance(predictor, LoadedPredictor):
        origin, model = predictor.directory, predictor.model
    elif isinstance(predictor, NextLayerPredictor):
        origin, model = "predictor", predictor
    else:
        raise TypeError(f"predictor: expected a run directory, LoadedPredictor or NextLayerPredictor, got {type(predictor).__name__}")
    config = model.config
    check_lookahead(lookahead, trace.num_layers)
    check_trace_compatible(config, trace, origin, lookahead)
    check_feature_source(trace, config.feature_source)
    check_table_size(trace.num_passes, trace.num_layers, config.lookahead, trace.num_experts, max_bytes)

    features = build_features(trace, config.window, config.feature_source, max_bytes=max_bytes)
    table = np.ascontiguousarray(predict_passes(model, features)[:, :, :lookahead])
    clear_past_last_step(table)
    return table


def evaluation_split(loaded: LoadedPredictor, trace: Trace) -> tuple[int, int, bool]:
    """Return (first test pass, baseline training passes, same trace) for evaluating `loaded` on `trace`.

    On the training trace the run's own split is reused. On another trace every pass is unseen by the
    predictor, and the passes are split with the run's train fraction so that the baselines get the
    same share of passes to estimate from.
    """
    saved = loaded.info.trace
    same_source = os.path.realpath(str(saved["source"])) == os.path.realpath(str(trace.metadata.source))
    same_trace = same_source and (saved["num_passes"], saved["name"]) == (trace.num_passes, trace.name)
    if same_trace:
        return loaded.info.split.validation_end, loaded.info.split.validation_end, True
    first = split_passes(trace.num_passes, loaded.info.train["train_fraction"], loaded.info.train["validation_fraction"])
    return first.validation_end, first.validation_end, False


def evaluate_run(predictor: str | os.PathLike | LoadedPredictor, trace: Trace) -> EvaluationReport:
    """Evaluate a trained predictor and the free baselines on the test passes of `trace`."""
    loaded = predictor if isinstance(predictor, LoadedPredictor) else load_predictor(predictor)
    first_pass, train_passes, _ = evaluation_split(loaded, trace)
    lookahead = loaded.config.lookahead
    table = predict_scores(loaded, trace, lookahead)
    targets = build_targets(trace, lookahead)
    return evaluate_tables(trace, table, targets, first_pass, train_passes)

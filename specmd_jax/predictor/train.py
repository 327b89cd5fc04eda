"""Training of the learned next-layer predictor: optax AdamW with warm-up and cosine decay, Orbax checkpoints.

Passes are split in order (`split_passes`): training passes, then validation passes, then test passes
that training never reads. A training label whose target step lies in a validation pass is masked
out, and so is a validation label whose target lies in a test pass. Each epoch visits the training
passes in an order drawn from (seed, epoch), so a resumed run repeats the data order of an
uninterrupted one, and on one backend the two end with the same parameters.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from specmd_jax.predictor import checkpoint
from specmd_jax.predictor.evaluate import mean_recall
from specmd_jax.predictor.features import StepTargets, build_features, build_targets, check_feature_source, split_passes
from specmd_jax.predictor.model import ConfigValueError, NextLayerPredictor, PredictorConfig
from specmd_jax.traces.trace import Trace

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training settings, stored in the run directory. A resumed run must use the same ones.

    Attributes:
      epochs: passes over the training passes.
      batch_size: passes per optimizer step (each pass contributes all its layers and offsets).
      learning_rate: peak AdamW learning rate, reached after `warmup_epochs` and then decayed to 0
        along a cosine.
      weight_decay: AdamW decoupled weight decay.
      warmup_epochs: epochs of linear warm-up from 0.
      seed: seed of the initial parameters and of the data order.
      train_fraction: fraction of passes for training and validation; the rest is the test set.
      validation_fraction: fraction of the train-and-validation passes, taken from their end, for validation.
    """

    epochs: int = 40
    batch_size: int = 32
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    warmup_epochs: int = 1
    seed: int = 0
    train_fraction: float = 0.75
    validation_fraction: float = 0.15

    def __post_init__(self):
        def reject(name: str, detail: str) -> ConfigValueError:
            return ConfigValueError("TrainConfig", name, detail)

        for name, low in (("epochs", 1), ("batch_size", 1), ("warmup_epochs", 0), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise reject(name, f"expected an integer >= {low}, got {value!r}")
        for name in ("learning_rate", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise reject(name, f"expected a finite number >= 0, got {value!r}")
        for name in ("train_fraction", "validation_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise reject(name, f"expected a number in (0, 1), got {value!r}")
        if self.warmup_epochs > self.epochs:
            raise reject("warmup_epochs", f"expected at most epochs={self.epochs}, got {self.warmup_epochs}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """Outcome of `train_predictor`.

    Attributes:
      history: one dictionary per finished epoch (epoch, train_loss, validation_recall), resumed ones included.
      best_epoch, best_validation_recall: the epoch kept under `best/` and its validation recall@k.
      start_epoch: the first epoch this call trained (1 unless it resumed).
      directory: the run directory.
    """

    history: list[dict[str, float]]
    best_epoch: int
    best_validation_recall: float
    start_epoch: int
    directory: str


def make_optimizer(train: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """Return AdamW with linear warm-up to `learning_rate` and cosine decay to 0 over all steps."""
    total_steps = train.epochs * steps_per_epoch
    # optax needs at least one decay step after the warm-up.
    warmup_steps = min(train.warmup_epochs * steps_per_epoch, total_steps - 1)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train.learning_rate, warmup_steps=warmup_steps, decay_steps=total_steps, end_value=0.0
    )
    return optax.adamw(schedule, weight_decay=train.weight_decay)


def prediction_loss(logits: jax.Array, requests: jax.Array, valid: jax.Array, loss: str) -> jax.Array:
    """Return the mean loss over valid (pass, layer, offset) rows of logits and 0/1 requests [B, L, D, E].

    "softmax" is the cross-entropy against the request set normalised to a distribution (listwise);
    "sigmoid" sums the per-expert binary cross-entropy of each row.
    """
    if loss == "softmax":
        distribution = requests / jnp.maximum(requests.sum(axis=-1, keepdims=True), 1.0)
        per_row = optax.softmax_cross_entropy(logits, distribution)
    else:
        per_row = optax.sigmoid_binary_cross_entropy(logits, requests).sum(axis=-1)
    weights = valid.astype(logits.dtype)
    return (per_row * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def _make_train_step(graphdef: nnx.GraphDef, rest: nnx.State, optimizer: optax.GradientTransformation, loss: str):
    def loss_fn(params, features, requests, valid):
        model = nnx.merge(graphdef, params, rest)
        return prediction_loss(model(features), requests, valid, loss)

    @jax.jit
    def train_step(params, opt_state, features, requests, valid):
        value, grads = jax.value_and_grad(loss_fn)(params, features, requests, valid)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return train_step


def predict_passes(model: NextLayerPredictor, features: np.ndarray, batch_passes: int = 256) -> np.ndarray:
    """Return float32 scores [P, L, D, E] of `model` for step features [P, L, F], in batches of passes."""
    score_fn = nnx.jit(lambda module, batch: module.scores(batch))
    config = model.config
    output = np.zeros((features.shape[0], config.num_layers, config.lookahead, config.num_experts), dtype=np.float32)
    for start in range(0, features.shape[0], batch_passes):
        batch = features[start:start + batch_passes]
        padded = np.zeros((batch_passes, *batch.shape[1:]), dtype=np.float32)
        padded[: len(batch)] = batch  # one batch shape, so one compilation
        output[start:start + len(batch)] = np.asarray(score_fn(model, jnp.asarray(padded)))[: len(batch)]
    return output


def _validation_recall(model: NextLayerPredictor, features: np.ndarray, targets: StepTargets, first: int, end: int, k: int) -> float:
    table = np.zeros(targets.requests.shape, dtype=np.float32)
    table[first:end] = predict_passes(model, features[first:end])
    return mean_recall(table, targets, k, first, end)


def _check_resumable(directory: Path, info: checkpoint.RunInfo) -> None:
    """Raise ValueError when the run directory describes another run than `info`."""
    saved = checkpoint.read_run_info(directory)
    for field, ours, theirs in (
        ("model", info.model.to_dict(), saved.model.to_dict()),
        ("train", info.train, saved.train),
        ("trace", info.trace, saved.trace),
        ("split", info.split.to_dict(), saved.split.to_dict()),
    ):
        if ours != theirs:
            changed = sorted(key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key))
            raise ValueError(
                f"{directory / checkpoint.RUN_FILE}: the saved run has other '{field}' settings ({', '.join(changed)}: "
                f"saved {[theirs.get(key) for key in changed]}, requested {[ours.get(key) for key in changed]}); "
                f"resume with the saved settings, or train into a new directory"
            )


def _resumable_epoch(directory: Path, info: checkpoint.RunInfo) -> int | None:
    """Return the latest epoch to resume from, or None to start afresh.

    Raises ValueError when `directory` has an incomplete epoch folder, when its `predictor.json`
    describes another run than `info` (even without a saved epoch), or when it has epoch folders but
    no `predictor.json`.
    """
    checkpoint.check_no_incomplete_epochs(directory)
    if not (directory / checkpoint.RUN_FILE).is_file():
        for kind in checkpoint.CHECKPOINT_KINDS:
            if checkpoint.latest_epoch(directory, kind) is not None:
                raise ValueError(
                    f"{directory}: contains {kind}/ checkpoints but no {checkpoint.RUN_FILE}, so they cannot be "
                    f"resumed; train into a new directory, or delete {directory / kind}"
                )
        return None
    _check_resumable(directory, info)
    return checkpoint.latest_epoch(directory, checkpoint.LATEST)


def _delete_best_after(directory: Path, epoch: int) -> None:
    """Delete best/ epochs after `epoch`: an interrupted run saved them, and training repeats those epochs."""
    complete, _ = checkpoint.epoch_folders(directory, checkpoint.BEST)
    for stale in (number for number in complete if number > epoch):
        logger.info("%s: deleting best/%d, saved after latest/%d by an interrupted run; that epoch is trained again", directory, stale, epoch)
        checkpoint.delete_checkpoint(directory, checkpoint.BEST, stale)


def _reconcile_best(
    directory: Path, resumed: int, params: nnx.State, best_epoch: int, best_recall: float, history: list[dict[str, float]]
) -> tuple[int, float]:
    """Make best/ agree with the resumed latest/ epoch, and return the (best epoch, its recall) to continue from.

    An interrupted run can leave best/ ahead of latest/ (earlier versions of `train_predictor` saved
    best/ first), or without the epoch that latest/ names as the best (stopped while writing best/).
    """
    _delete_best_after(directory, resumed)
    if best_epoch == checkpoint.latest_epoch(directory, checkpoint.BEST):
        return best_epoch, best_recall
    if best_epoch == resumed:
        checkpoint.save_checkpoint(directory, checkpoint.BEST, resumed, params, {"epoch": resumed, "validation_recall": best_recall})
        return best_epoch, best_recall

    # The best epoch's parameters are gone, so best/ restarts from the resumed epoch.
    recall = float(history[-1]["validation_recall"]) if history else -1.0
    logger.warning(
        "%s: best/ has no checkpoint of the best epoch %d (validation recall@k %.4f); keeping epoch %d (%.4f) as "
        "the best so far", directory, best_epoch, best_recall, resumed, recall,
    )
    checkpoint.save_checkpoint(directory, checkpoint.BEST, resumed, params, {"epoch": resumed, "validation_recall": recall})
    return resumed, recall


def train_predictor(
    trace: Trace,
    directory: str | os.PathLike,
    model_config: PredictorConfig,
    train: TrainConfig,
    *,
    stop_after_epoch: int | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train a predictor on `trace`, saving every epoch under `directory/latest` and the best under `directory/best`.

    When `directory` already contains a run with the same settings, training resumes after its latest
    epoch. It first repairs what an interrupted save left (`_reconcile_best`). Other settings raise
    ValueError. `stop_after_epoch` ends this call early (the run can be resumed later) and is meant for
    splitting long runs.
    """
    directory = Path(directory)
    checkpoint.check_run_directory(directory)
    check_feature_source(trace, model_config.feature_source)
    checkpoint.check_trace_compatible(model_config, trace, "train-predictor", model_config.lookahead)
    split = split_passes(trace.num_passes, train.train_fraction, train.validation_fraction)
    info = checkpoint.RunInfo(model=model_config, train=train.to_dict(), trace=checkpoint.describe_trace(trace), split=split)

    features = build_features(trace, model_config.window, model_config.feature_source)
    targets = build_targets(trace, model_config.lookahead)
    train_valid = targets.valid_before(split.train_end)
    steps_per_epoch = -(-split.train_end // train.batch_size)
    optimizer = make_optimizer(train, steps_per_epoch)

    model = NextLayerPredictor(model_config, rngs=nnx.Rngs(train.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = optimizer.init(params)
    history: list[dict[str, float]] = []
    best_epoch, best_recall = 0, -1.0
    start_epoch = 1

    # Resume from the latest epoch of the same run, if there is one.
    resumed = _resumable_epoch(directory, info)
    if resumed is not None:
        restored, opt_state, metadata, resumed = checkpoint.restore_checkpoint(
            directory, checkpoint.LATEST, model_config, opt_state_template=opt_state
        )
        _, params, _ = nnx.split(restored, nnx.Param, ...)
        history = list(metadata.get("history", []))
        best_epoch, best_recall = int(metadata["best_epoch"]), float(metadata["best_validation_recall"])
        best_epoch, best_recall = _reconcile_best(directory, resumed, params, best_epoch, best_recall, history)
        start_epoch = resumed + 1
        logger.info("resuming %s after epoch %d (best validation recall@k %.4f at epoch %d)", directory, resumed, best_recall, best_epoch)
    else:
        _delete_best_after(directory, 0)
        checkpoint.write_run_info(directory, info)

    train_step = _make_train_step(graphdef, rest, optimizer, model_config.loss)
    last_epoch = train.epochs if stop_after_epoch is None else min(train.epochs, stop_after_epoch)
    epochs = range(start_epoch, last_epoch + 1)
    for epoch in tqdm(epochs, desc="train-predictor", unit="epoch", disable=not progress):
        order = np.random.default_rng([train.seed, epoch]).permutation(split.train_end)
        losses = []
        for start in range(0, split.train_end, train.batch_size):
            batch = order[start:start + train.batch_size]
            padding = train.batch_size - len(batch)
            batch_valid = train_valid[batch]
            if padding:
                # The last batch is padded with masked rows, so every step has one shape.
                batch = np.concatenate([batch, np.zeros(padding, dtype=batch.dtype)])
                batch_valid = np.concatenate([batch_valid, np.zeros((padding, *batch_valid.shape[1:]), dtype=bool)])
            params, opt_state, loss = train_step(
                params, opt_state, jnp.asarray(features[batch]), jnp.asarray(targets.requests[batch]), jnp.asarray(batch_valid)
            )
            losses.append(float(loss))

        model = nnx.merge(graphdef, params, rest)
        recall = _validation_recall(model, features, targets, split.train_end, split.validation_end, trace.top_k)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "validation_recall": recall})
        is_best = recall >= best_recall  # on a tie the later, longer-trained epoch is kept
        if is_best:
            best_epoch, best_recall = epoch, recall
        metadata = {
            "epoch": epoch, "validation_recall": recall, "best_epoch": best_epoch,
            "best_validation_recall": best_recall, "history": history,
        }
        # latest/ goes first: when the run stops before best/ is written, the resume rewrites best/
        # from latest/ (see `_reconcile_best`).
        checkpoint.save_checkpoint(directory, checkpoint.LATEST, epoch, params, metadata, opt_state=opt_state)
        if is_best:
            checkpoint.save_checkpoint(directory, checkpoint.BEST, epoch, params, {"epoch": epoch, "validation_recall": recall})
        logger.info(
            "epoch %d/%d: train loss %.4f, validation recall@%d %.4f (best %.4f at epoch %d)",
            epoch, train.epochs, history[-1]["train_loss"], trace.top_k, recall, best_recall, best_epoch,
        )
    return TrainResult(
        history=history, best_epoch=best_epoch, best_validation_recall=best_recall,
        start_epoch=start_epoch, directory=str(directory),
    )

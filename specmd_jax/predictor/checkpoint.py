"""Run directories of the learned predictor: its description file and Orbax checkpoints.

Layout of a run directory:
  predictor.json  the `PredictorConfig`, the training settings, the trace's shape and the pass split.
  latest/         one Orbax step (the last finished epoch) with params, opt_state and metadata, for resuming.
  best/           one Orbax step (the epoch with the best validation recall@k) with params and metadata.
The step number of both is the epoch. `metadata` is a JSON dictionary (epoch, validation recall, history).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from specmd_jax.predictor.features import PassSplit
from specmd_jax.predictor.model import NextLayerPredictor, PredictorConfig
from specmd_jax.traces.trace import Trace

logger = logging.getLogger(__name__)

RUN_FILE = "predictor.json"
RUN_FORMAT = "specmd-jax-predictor"
RUN_VERSION = 1
LATEST = "latest"
BEST = "best"
CHECKPOINT_KINDS = (LATEST, BEST)
TRACE_FIELDS = ("name", "source", "num_passes", "num_layers", "num_experts", "top_k")


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """Contents of `predictor.json`.

    Attributes:
      model: the predictor's shape and inputs.
      train: training settings as `TrainConfig.to_dict` writes them.
      trace: the training trace's name, source, passes, layers, experts and top-k.
      split: the pass split used for training, validation and test.
    """

    model: PredictorConfig
    train: dict[str, Any]
    trace: dict[str, Any]
    split: PassSplit

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RUN_FORMAT, "version": RUN_VERSION, "model": self.model.to_dict(),
            "train": self.train, "trace": self.trace, "split": self.split.to_dict(),
        }


def describe_trace(trace: Trace) -> dict[str, Any]:
    """Return the trace facts that `RunInfo.trace` stores."""
    meta = trace.metadata
    return {
        "name": trace.name, "source": meta.source, "num_passes": trace.num_passes,
        "num_layers": meta.num_layers, "num_experts": meta.num_experts, "top_k": meta.top_k,
    }


def write_run_info(directory: str | os.PathLike, info: RunInfo) -> None:
    path = Path(directory) / RUN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info.to_dict(), indent=2, sort_keys=True) + "\n")


def read_run_info(directory: str | os.PathLike) -> RunInfo:
    """Read and check `predictor.json` of a run directory; raise FileNotFoundError or ValueError naming the file."""
    path = Path(directory) / RUN_FILE
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"{directory}: predictor run directory not found")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found; expected a run directory written by train-predictor")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: invalid JSON ({error}); the run description is corrupt") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if data.get("format") != RUN_FORMAT:
        raise ValueError(f"{path}: field 'format': expected {RUN_FORMAT!r}, got {data.get('format')!r}")
    if data.get("version") != RUN_VERSION:
        raise ValueError(f"{path}: field 'version': expected {RUN_VERSION}, got {data.get('version')!r}")
    missing = [key for key in ("model", "train", "trace", "split") if not isinstance(data.get(key), dict)]
    if missing:
        raise ValueError(f"{path}: fields {missing}: expected JSON objects, got {[data.get(key) for key in missing]}")
    model = PredictorConfig.from_dict(data["model"], str(path))
    trace = data["trace"]
    absent = [field for field in TRACE_FIELDS if field not in trace]
    if absent:
        raise ValueError(f"{path}: field 'trace': missing keys {absent}")
    split = data["split"]
    try:
        split = PassSplit(**split)
    except TypeError:
        raise ValueError(f"{path}: field 'split': expected keys train_end, validation_end, num_passes, got {sorted(split)}") from None
    if not 0 < split.train_end < split.validation_end < split.num_passes:
        raise ValueError(f"{path}: field 'split': expected 0 < train_end < validation_end < num_passes, got {split}")
    return RunInfo(model=model, train=data["train"], trace=trace, split=split)


def check_trace_compatible(config: PredictorConfig, trace: Trace, origin: str, lookahead: int | None = None) -> None:
    """Raise ValueError unless a predictor with `config` can score `trace` at `lookahead` offsets.

    The layer and expert counts must match, and `lookahead` may not exceed the one it was trained for.
    """
    for field, expected, actual in (
        ("num_layers", config.num_layers, trace.num_layers),
        ("num_experts", config.num_experts, trace.num_experts),
    ):
        if expected != actual:
            raise ValueError(
                f"{origin}: predictor has {field}={expected}, but trace {trace.name} ({trace.metadata.source}) has "
                f"{field}={actual}; train a predictor on a trace of this model"
            )
    if lookahead is not None and not 1 <= lookahead <= config.lookahead:
        raise ValueError(
            f"{origin}: lookahead {lookahead} requested, but the predictor was trained for 1 .. {config.lookahead}; "
            f"request at most {config.lookahead} or train with a longer lookahead"
        )


def _manager(directory: str | os.PathLike, kind: str) -> ocp.CheckpointManager:
    if kind not in CHECKPOINT_KINDS:
        raise ValueError(f"checkpoint kind: expected one of {', '.join(CHECKPOINT_KINDS)}, got {kind!r}")
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
    return ocp.CheckpointManager(Path(directory).absolute() / kind, options=options)


def latest_epoch(directory: str | os.PathLike, kind: str) -> int | None:
    """Return the epoch saved under `kind` ("latest" or "best"), or None when nothing was saved."""
    if not (Path(directory) / kind).is_dir():
        return None
    manager = _manager(directory, kind)
    try:
        return manager.latest_step()
    finally:
        manager.close()


def save_checkpoint(
    directory: str | os.PathLike, kind: str, epoch: int, params: nnx.State, metadata: dict[str, Any], opt_state: Any = None
) -> None:
    """Save `params` (and `opt_state` when given) with `metadata` as epoch `epoch` under `kind`; wait for the write."""
    items = {"params": ocp.args.StandardSave(params), "metadata": ocp.args.JsonSave(metadata)}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    manager = _manager(directory, kind)
    try:
        manager.save(epoch, args=ocp.args.Composite(**items), force=True)
        manager.wait_until_finished()
    finally:
        manager.close()
    logger.info("saved %s checkpoint of epoch %d to %s", kind, epoch, directory)


def abstract_predictor(config: PredictorConfig) -> NextLayerPredictor:
    """Return a predictor with shapes only (no arrays), the template for restoring."""
    return nnx.eval_shape(lambda: NextLayerPredictor(config, rngs=nnx.Rngs(0)))


def restore_checkpoint(
    directory: str | os.PathLike, kind: str, config: PredictorConfig, opt_state_template: Any = None
) -> tuple[NextLayerPredictor, Any, dict[str, Any], int]:
    """Restore the model (and the optimizer state when a template is given) saved under `kind`.

    Returns (model, opt_state or None, metadata, epoch). Raises FileNotFoundError when nothing is
    saved, and ValueError naming the directory when the saved arrays are unreadable or do not fit
    `config`.
    """
    epoch = latest_epoch(directory, kind)
    if epoch is None:
        raise FileNotFoundError(f"{Path(directory) / kind}: no saved checkpoint found")
    graphdef, abstract_params, rest = nnx.split(abstract_predictor(config), nnx.Param, ...)
    items = {
        "params": ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_params)),
        "metadata": ocp.args.JsonRestore(),
    }
    if opt_state_template is not None:
        items["opt_state"] = ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, opt_state_template))
    manager = _manager(directory, kind)
    try:
        restored = manager.restore(epoch, args=ocp.args.Composite(**items))
    except Exception as error:  # Orbax raises many types (KeyError, ValueError, OSError, tensorstore errors)
        first_line = (str(error).splitlines() or [""])[0][:300]
        raise ValueError(
            f"{Path(directory) / kind}: cannot restore epoch {epoch} ({type(error).__name__}: {first_line}); the "
            f"checkpoint is incomplete or corrupt, or its arrays do not match the model that {RUN_FILE} describes"
        ) from None
    finally:
        manager.close()
    _check_restored_shapes(restored["params"], abstract_params, Path(directory) / kind)
    model = nnx.merge(graphdef, restored["params"], rest)
    opt_state = restored["opt_state"] if opt_state_template is not None else None
    logger.info("restored %s checkpoint of epoch %d from %s", kind, epoch, directory)
    return model, opt_state, dict(restored["metadata"] or {}), int(epoch)


def _check_restored_shapes(restored: nnx.State, expected: nnx.State, origin: Path) -> None:
    """Raise ValueError when a restored array's shape differs from the model's (Orbax may not check it)."""
    restored_leaves = jax.tree_util.tree_leaves_with_path(restored)
    expected_leaves = jax.tree_util.tree_leaves_with_path(expected)
    for (path, actual), (_, wanted) in zip(restored_leaves, expected_leaves, strict=True):
        if actual.shape != wanted.shape:
            name = jax.tree_util.keystr(path)
            raise ValueError(
                f"{origin}: parameter {name}: expected shape {wanted.shape} from {RUN_FILE}, got {actual.shape}; "
                f"the checkpoint was saved for another predictor configuration"
            )


@dataclasses.dataclass(frozen=True)
class LoadedPredictor:
    """A restored predictor with its run description and checkpoint metadata."""

    model: NextLayerPredictor
    info: RunInfo
    metadata: dict[str, Any]
    epoch: int
    directory: str

    @property
    def config(self) -> PredictorConfig:
        return self.info.model


def load_predictor(directory: str | os.PathLike, kind: str = BEST) -> LoadedPredictor:
    """Load the predictor saved under `kind` ("best" by default) in a run directory."""
    info = read_run_info(directory)
    model, _, metadata, epoch = restore_checkpoint(directory, kind, info.model)
    return LoadedPredictor(model=model, info=info, metadata=metadata, epoch=epoch, directory=str(directory))

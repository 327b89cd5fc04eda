"""Orbax checkpoints of a predictor run directory.

Layout of a run directory:
  predictor.json  the `PredictorConfig`, the training settings, the trace's shape and the pass split (`run_info`).
  latest/         one Orbax step (the last finished epoch) with params, opt_state and metadata, for resuming.
  best/           one Orbax step (the epoch with the best validation recall@k) with params and metadata.
The step number of both is the epoch. `metadata` is a JSON dictionary (epoch, validation recall, and in
latest/ the best epoch, its recall and the history).

Orbax writes an epoch under a temporary name (`<epoch>.orbax-checkpoint-tmp...`) and renames it when
the write is done. Here an epoch folder is complete when it contains every item folder of its kind
(`ITEMS`). Loading skips incomplete folders, and training raises an error naming them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from specmd_jax.predictor.model import NextLayerPredictor, PredictorConfig
from specmd_jax.predictor.run_info import (  # noqa: F401  re-exported: callers import the run description from here
    RUN_FILE,
    RUN_FORMAT,
    RUN_VERSION,
    TRACE_FIELDS,
    RunInfo,
    check_run_directory,
    check_trace_compatible,
    describe_trace,
    read_run_info,
    write_run_info,
)

logger = logging.getLogger(__name__)

LATEST = "latest"
BEST = "best"
CHECKPOINT_KINDS = (LATEST, BEST)
ITEMS = {LATEST: ("params", "metadata", "opt_state"), BEST: ("params", "metadata")}
"""Item folders of a complete epoch folder of each kind."""


def _kind_directory(directory: str | os.PathLike, kind: str) -> Path:
    if kind not in CHECKPOINT_KINDS:
        raise ValueError(f"checkpoint kind: expected one of {', '.join(CHECKPOINT_KINDS)}, got {kind!r}")
    return Path(directory) / kind


def _missing_items(folder: Path, kind: str) -> list[str]:
    return [item for item in ITEMS[kind] if not (folder / item).is_dir()]


def epoch_folders(directory: str | os.PathLike, kind: str) -> tuple[dict[int, Path], dict[int, Path]]:
    """Return the (complete, incomplete) epoch folders under `kind`, each by epoch in ascending order.

    Orbax's temporary folders are not epoch folders and are left out.
    """
    root = _kind_directory(directory, kind)
    complete: dict[int, Path] = {}
    incomplete: dict[int, Path] = {}
    if not root.is_dir():
        return complete, incomplete
    for folder in root.iterdir():
        if not folder.is_dir() or not re.fullmatch(r"[0-9]+", folder.name):
            continue
        group = incomplete if _missing_items(folder, kind) else complete
        group[int(folder.name)] = folder
    return dict(sorted(complete.items())), dict(sorted(incomplete.items()))


def latest_epoch(directory: str | os.PathLike, kind: str) -> int | None:
    """Return the newest complete epoch saved under `kind` ("latest" or "best"), or None when there is none."""
    complete, _ = epoch_folders(directory, kind)
    return max(complete, default=None)


def check_no_incomplete_epochs(directory: str | os.PathLike) -> None:
    """Raise ValueError naming the first incomplete epoch folder of `directory`, which training cannot save over."""
    for kind in CHECKPOINT_KINDS:
        _, incomplete = epoch_folders(directory, kind)
        if incomplete:
            folder = next(iter(incomplete.values()))
            raise ValueError(
                f"{folder}: incomplete checkpoint (missing item folders: {', '.join(_missing_items(folder, kind))}); "
                f"delete this folder and run again to resume from the last complete epoch"
            )


def _manager(directory: str | os.PathLike, kind: str) -> ocp.CheckpointManager:
    # cleanup_tmp_directories deletes the temporary folders of a save that was interrupted.
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(_kind_directory(directory, kind).absolute(), options=options)


def save_checkpoint(
    directory: str | os.PathLike, kind: str, epoch: int, params: nnx.State, metadata: dict[str, Any], opt_state: Any = None
) -> None:
    """Save `params` (and `opt_state` when given) with `metadata` as epoch `epoch` under `kind`, and wait for the write.

    An existing checkpoint of the same epoch is replaced, because Orbax does not overwrite a step.
    """
    items = {"params": ocp.args.StandardSave(params), "metadata": ocp.args.JsonSave(metadata)}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    manager = _manager(directory, kind)
    try:
        if epoch in manager.all_steps():
            manager.delete(epoch)
        manager.save(epoch, args=ocp.args.Composite(**items), force=True)
        manager.wait_until_finished()
    finally:
        manager.close()
    logger.info("saved %s checkpoint of epoch %d to %s", kind, epoch, directory)


def delete_checkpoint(directory: str | os.PathLike, kind: str, epoch: int) -> None:
    """Delete the checkpoint of epoch `epoch` under `kind`."""
    manager = _manager(directory, kind)
    try:
        manager.delete(epoch)
    finally:
        manager.close()
    logger.info("deleted %s checkpoint of epoch %d from %s", kind, epoch, directory)


def abstract_predictor(config: PredictorConfig) -> NextLayerPredictor:
    """Return a predictor with shapes only (no arrays), the template for restoring."""
    return nnx.eval_shape(lambda: NextLayerPredictor(config, rngs=nnx.Rngs(0)))


def restore_checkpoint(
    directory: str | os.PathLike, kind: str, config: PredictorConfig, opt_state_template: Any = None
) -> tuple[NextLayerPredictor, Any, dict[str, Any], int]:
    """Restore the model (and the optimizer state when a template is given) of the newest complete epoch under `kind`.

    Returns (model, opt_state or None, metadata, epoch). A newer incomplete epoch folder is skipped with
    a warning. Raises FileNotFoundError when nothing is saved, and ValueError naming the folder when
    the saved arrays are unreadable or do not fit `config`.
    """
    root = _kind_directory(directory, kind)
    complete, incomplete = epoch_folders(directory, kind)
    if not complete:
        if incomplete:
            folders = ", ".join(str(folder) for folder in incomplete.values())
            raise ValueError(
                f"{root}: no complete checkpoint, only incomplete folders ({folders}); delete them and run "
                f"train-predictor again with the same options"
            )
        raise FileNotFoundError(f"{root}: no saved checkpoint found")
    epoch, folder = max(complete.items())
    for skipped in (path for number, path in incomplete.items() if number > epoch):
        logger.warning(
            "%s: skipped, it is not a complete checkpoint (missing item folders: %s); loading epoch %d instead. Delete the folder "
            "to remove this warning", skipped, ", ".join(_missing_items(skipped, kind)), epoch,
        )

    graphdef, abstract_params, rest = nnx.split(abstract_predictor(config), nnx.Param, ...)
    params_template = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_params)
    _check_saved_shapes(folder, params_template)
    items = {"params": ocp.args.StandardRestore(params_template), "metadata": ocp.args.JsonRestore()}
    if opt_state_template is not None:
        items["opt_state"] = ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, opt_state_template))
    restored = _restore_items(folder, epoch, items)

    model = nnx.merge(graphdef, restored["params"], rest)
    opt_state = restored["opt_state"] if opt_state_template is not None else None
    logger.info("restored %s checkpoint of epoch %d from %s", kind, epoch, directory)
    return model, opt_state, dict(restored["metadata"] or {}), int(epoch)


def _array_names(tree: Any) -> dict[str, tuple[int, ...]]:
    """Return {name: shape} of the arrays of a parameter tree, named like `head_kernel` (the `value` level dropped)."""
    shapes = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        keys = [str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path]
        if keys and keys[-1] == "value":
            keys = keys[:-1]
        shapes[".".join(keys)] = tuple(leaf.shape)
    return shapes


def _check_saved_shapes(folder: Path, params_template: Any) -> None:
    """Raise ValueError when the saved parameter arrays differ in name or shape from the model's.

    This reads only Orbax's array metadata, so a mismatch never reaches `restore` (whose own message
    suggests Orbax options that do not apply here).
    """
    handler = ocp.StandardCheckpointHandler()
    try:
        with _orbax_failure_reports_dropped():
            saved = _array_names(handler.metadata(folder.absolute() / "params").tree)
    except Exception as error:  # Orbax raises many types (OSError, ValueError, KeyError, JSON errors)
        raise ValueError(
            f"{folder}: cannot read the array metadata of the saved parameters ({type(error).__name__}: "
            f"{_first_line(error)}); the checkpoint is incomplete or corrupt. Delete {folder} and run train-predictor "
            f"again with the same options"
        ) from error
    finally:
        handler.close()

    expected = _array_names(params_template)
    if saved.keys() != expected.keys():
        raise ValueError(
            f"{folder / 'params'}: saved arrays {sorted(saved)}, but the model in {RUN_FILE} has arrays "
            f"{sorted(expected)}; {RUN_FILE} was edited or belongs to another run. Undo the edit, or train a new run"
        )
    for name, shape in expected.items():
        if saved[name] != shape:
            raise ValueError(
                f"{folder / 'params'}: array {name} has shape {saved[name]}, but the model in {RUN_FILE} needs "
                f"{shape}; {RUN_FILE} was edited or belongs to another run. Undo the edit, or train a new run"
            )


def _first_line(error: BaseException) -> str:
    """Return the first line of an Orbax or TensorStore error, without the parts that do not help a user.

    Those are TensorStore's JSON spec of the store (`[tensorstore_spec=...]`) and Orbax's advice on
    options of its own restore API.
    """
    line = (str(error).splitlines() or [""])[0]
    line = line.split(" [tensorstore_spec=")[0]
    return line.split(" Truncating/padding is disabled.")[0]


def _restore_items(folder: Path, epoch: int, items: dict[str, Any]) -> dict[str, Any]:
    """Restore `items` from an epoch folder, or raise ValueError naming the folder when Orbax fails."""
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        with _orbax_failure_reports_dropped():
            return checkpointer.restore(folder.absolute(), args=ocp.args.Composite(**items))
    except Exception as error:  # Orbax raises many types (KeyError, ValueError, OSError, TensorStore errors)
        raise ValueError(
            f"{folder}: cannot read the checkpoint of epoch {epoch} ({type(error).__name__}: {_first_line(error)}); "
            f"the checkpoint is incomplete or corrupt. Delete {folder} and run train-predictor again with the same options"
        ) from error
    finally:
        checkpointer.close()


@contextlib.contextmanager
def _orbax_failure_reports_dropped():
    """Install `_OrbaxTeardownFilter` while Orbax reads, and leave it installed when the read fails."""
    previous_hook = sys.unraisablehook
    noise_filter = None
    if not isinstance(previous_hook, _OrbaxTeardownFilter):
        noise_filter = _OrbaxTeardownFilter(previous_hook)
        sys.unraisablehook = noise_filter
    try:
        yield
    except Exception:
        # Report Orbax's unawaited coroutines now, while the filter is installed.
        gc.collect()
        raise
    if noise_filter is not None and sys.unraisablehook is noise_filter:
        sys.unraisablehook = previous_hook


class _OrbaxTeardownFilter:
    """A `sys.unraisablehook` that drops the reports a failed Orbax restore leaves behind and passes on the rest.

    NOTE: in orbax-checkpoint 0.12.8 a restore that fails on one array closes its event loop while
    TensorStore still reads the others. Those reads then report `RuntimeError: Event loop is closed`,
    and Orbax's unawaited coroutines report their errors, through `sys.unraisablehook`, at any time
    until the process exits (70 lines of traceback after the error message). So after a failure the
    filter stays installed.
    """

    def __init__(self, previous: Any):
        self.previous = previous

    def __call__(self, unraisable: Any) -> None:
        if _is_orbax_teardown_report(unraisable):
            logger.debug("dropped a report of a failed Orbax restore: %r", unraisable.exc_value)
            return
        self.previous(unraisable)


def _is_orbax_teardown_report(unraisable: Any) -> bool:
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        functions = [frame.name for frame in traceback.extract_tb(unraisable.exc_traceback)]
        return "call_soon_threadsafe" in functions
    coroutine = unraisable.object
    if inspect.iscoroutine(coroutine):
        return f"{os.sep}orbax{os.sep}" in coroutine.cr_code.co_filename
    return False


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

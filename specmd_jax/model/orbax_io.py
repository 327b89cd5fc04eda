"""Save and restore model parameters (and optionally an optimizer state) with Orbax.

A run directory contains `model_config.json` (the `ModelConfig`) and one Orbax step directory per saved
step, each with the items `params`, `opt_state` (when saved) and `metadata` (a JSON dictionary).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from specmd_jax.model.config import ModelConfig
from specmd_jax.model.transformer import MoeTransformer

logger = logging.getLogger(__name__)

CONFIG_FILE = "model_config.json"


def checkpoint_manager(directory: str | os.PathLike, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """Create an Orbax manager for a run directory (created if absent) that keeps the last `max_to_keep` steps."""
    directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(directory, options=options)


def is_run_directory(directory: str | os.PathLike) -> bool:
    return (Path(directory) / CONFIG_FILE).is_file()


def save_step(
    manager: ocp.CheckpointManager,
    step: int,
    model: MoeTransformer,
    opt_state: Any = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Save the model's parameters, `opt_state` if given, and `metadata` as step `step`; wait for the write."""
    directory = Path(manager.directory)
    (directory / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2))
    items = {
        "params": ocp.args.StandardSave(nnx.state(model, nnx.Param)),
        "metadata": ocp.args.JsonSave(metadata or {}),
    }
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    manager.save(step, args=ocp.args.Composite(**items))
    manager.wait_until_finished()
    logger.info("saved step %d to %s", step, directory)


def read_run_config(directory: str | os.PathLike) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found; expected a run directory written by save_step")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a readable model configuration ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return ModelConfig.from_dict(data)


def restore_step(
    directory: str | os.PathLike,
    step: int | None = None,
    opt_state_template: Any = None,
    model_template: MoeTransformer | None = None,
) -> tuple[MoeTransformer, Any, dict[str, Any], int]:
    """Restore a model (and the optimizer state when a template is given) from a run directory.

    Returns (model, opt_state or None, metadata, step). `step` defaults to the latest saved step.
    """
    config = read_run_config(directory)
    manager = checkpoint_manager(directory)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{directory}: no saved step found")
    template = model_template or nnx.eval_shape(lambda: MoeTransformer(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_params, rest = nnx.split(template, nnx.Param, ...)
    abstract_params = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_params)
    items = {
        "params": ocp.args.StandardRestore(abstract_params),
        "metadata": ocp.args.JsonRestore(),
    }
    if opt_state_template is not None:
        items["opt_state"] = ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, opt_state_template))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as error:  # Orbax raises many types (KeyError, ValueError, OSError, tensorstore errors)
        raise ValueError(
            f"{directory}: cannot restore step {step} ({type(error).__name__}: {str(error).splitlines()[0][:300]}); "
            f"the step is incomplete or corrupt, or was saved with another architecture than {CONFIG_FILE} describes"
        ) from None
    model = nnx.merge(graphdef, restored["params"], rest)
    opt_state = restored["opt_state"] if opt_state_template is not None else None
    logger.info("restored step %d from %s", step, directory)
    return model, opt_state, dict(restored["metadata"] or {}), int(step)

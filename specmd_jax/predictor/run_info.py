"""The description file `predictor.json` of a predictor run directory, and checks against a trace.

`predictor.json` stores the `PredictorConfig`, the training settings, the training trace's shape and
the pass split. `checkpoint` keeps the Orbax checkpoints next to it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from specmd_jax.predictor.features import PassSplit
from specmd_jax.predictor.model import PredictorConfig
from specmd_jax.traces.trace import Trace

RUN_FILE = "predictor.json"
RUN_FORMAT = "specmd-jax-predictor"
RUN_VERSION = 1
TRACE_FIELDS = ("name", "source", "num_passes", "num_layers", "num_experts", "top_k")
TRACE_COUNTS = ("num_passes", "num_layers", "num_experts", "top_k")
TRAIN_FRACTIONS = ("train_fraction", "validation_fraction")


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


def check_run_directory(directory: str | os.PathLike) -> None:
    """Raise ValueError when `directory` cannot become a run directory because it, or a parent, is a file."""
    directory = Path(directory)
    for path in (directory, *directory.parents):
        if not path.exists():
            continue
        if not path.is_dir():
            raise ValueError(
                f"run directory {directory}: expected a directory or a path that does not exist yet, but {path} is "
                f"an existing file; choose another path"
            )
        return


def write_run_info(directory: str | os.PathLike, info: RunInfo) -> None:
    check_run_directory(directory)
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
    _check_consistent(path, model, data["train"], trace, split)
    return RunInfo(model=model, train=data["train"], trace=trace, split=split)


def _check_consistent(path: Path, model: PredictorConfig, train: dict[str, Any], trace: dict[str, Any], split: PassSplit) -> None:
    """Raise ValueError when the sections of `predictor.json` contradict each other (an edited or corrupt file).

    The model must have the training trace's layer and expert counts, and the split must cover its passes.
    """
    for field in TRACE_COUNTS:
        value = trace[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{path}: field 'trace.{field}': expected an integer >= 1, got {value!r}")
    for field in TRAIN_FRACTIONS:
        value = train.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(f"{path}: field 'train.{field}': expected a number in (0, 1), got {value!r}")

    pairs = (
        ("model.num_layers", model.num_layers, "trace.num_layers", trace["num_layers"]),
        ("model.num_experts", model.num_experts, "trace.num_experts", trace["num_experts"]),
        ("split.num_passes", split.num_passes, "trace.num_passes", trace["num_passes"]),
    )
    for field, value, trace_field, trace_value in pairs:
        if value != trace_value:
            raise ValueError(
                f"{path}: field '{field}' is {value}, but field '{trace_field}' is {trace_value}; the two must be "
                f"equal, so the file was edited or is corrupt. Undo the edit, or train a new run"
            )


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

"""Subcommands `specmd-jax train-predictor` and `specmd-jax eval-predictor`."""

from __future__ import annotations

import argparse
import contextlib

from specmd_jax.cli import integer_at_least

_positive_int = integer_at_least(1)
_non_negative_int = integer_at_least(0)


# Settings fields that `train-predictor` options set. The trace sets the other `PredictorConfig` fields.
OPTION_OF_FIELD = {
    "lookahead": "--lookahead", "window": "--window", "hidden": "--hidden", "loss": "--loss",
    "epochs": "--epochs", "batch_size": "--batch-size", "learning_rate": "--learning-rate",
    "weight_decay": "--weight-decay", "warmup_epochs": "--warmup-epochs", "seed": "--seed",
    "train_fraction": "--train-fraction", "validation_fraction": "--validation-fraction",
}


@contextlib.contextmanager
def _options_named():
    """Re-raise a `ConfigValueError` of a field that an option sets as a ValueError naming the option."""
    from specmd_jax.predictor.model import ConfigValueError

    try:
        yield
    except ConfigValueError as error:
        option = OPTION_OF_FIELD.get(error.field)
        if option is None:
            raise
        raise ValueError(f"{option}: {error.detail}") from None


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add `train-predictor` and `eval-predictor` to the CLI's subparsers."""
    from specmd_jax.predictor.model import LOSSES
    from specmd_jax.predictor.train import TrainConfig
    from specmd_jax.timing import MODEL_PRESETS

    defaults = TrainConfig()
    formatter = argparse.ArgumentDefaultsHelpFormatter
    train = subparsers.add_parser(
        "train-predictor", help="train the learned next-layer expert predictor on a trace", formatter_class=formatter,
        description="Train the predictor on the first passes of a trace, keep the checkpoint with the best "
        "validation recall@k, and print its accuracy and the free baselines' on the test passes. Training "
        "resumes when --out holds an unfinished run with the same settings.",
    )
    train.add_argument("--trace", required=True, help="trace file (canonical .npz, FLAME-MoE .npz, Mixtral .jsonl) or synthetic:PRESET")
    train.add_argument("--out", required=True, metavar="DIR", help="run directory for predictor.json and the Orbax checkpoints")
    train.add_argument("--epochs", type=_positive_int, default=defaults.epochs, help="passes over the training passes")
    train.add_argument("--lookahead", type=_positive_int, default=3, help="layers ahead to predict (offsets 1 .. lookahead)")
    train.add_argument("--window", type=_positive_int, default=3, help="layers of router probabilities in the features (l, l - 1, ...)")
    train.add_argument("--hidden", type=_non_negative_int, default=0, help="width of a shared GELU hidden layer; 0 is a linear model")
    train.add_argument("--shared", action="store_true", help="one shared model with a layer embedding instead of per-layer output heads")
    train.add_argument("--loss", choices=LOSSES, default="softmax", help="listwise softmax cross-entropy or per-expert sigmoid")
    train.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size, help="passes per optimizer step")
    train.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="peak AdamW learning rate")
    train.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay")
    train.add_argument("--warmup-epochs", type=_non_negative_int, default=defaults.warmup_epochs, help="epochs of linear learning-rate warm-up")
    train.add_argument("--seed", type=_non_negative_int, default=defaults.seed, help="seed of the initial weights and the data order")
    train.add_argument("--train-fraction", type=float, default=defaults.train_fraction, help="fraction of passes (from the start) for training and validation")
    train.add_argument("--validation-fraction", type=float, default=defaults.validation_fraction, help="fraction of those passes (from their end) for validation")
    train.add_argument("--model", choices=sorted(MODEL_PRESETS), help="model shape to report the predictor's cost against (by default the preset that matches the trace)")
    train.add_argument("--quiet", action="store_true", help="hide the progress bar")
    train.set_defaults(handler=cmd_train_predictor)

    evaluate = subparsers.add_parser(
        "eval-predictor", help="print a trained predictor's accuracy against the free baselines", formatter_class=formatter,
        description="Print recall@k, precision@k, F1, top-1 accuracy and recall@2k per layer pair on the test passes, "
        "for the learned predictor and the free baselines (current layer, co-occurrence, frequency, previous pass, "
        "and gate-speculative when the trace has speculative logits).",
    )
    evaluate.add_argument("--trace", required=True, help="trace file or synthetic:PRESET")
    evaluate.add_argument("--checkpoint", required=True, metavar="DIR", help="run directory written by train-predictor")
    evaluate.add_argument("--kind", choices=("best", "latest"), default="best", help="which saved checkpoint to evaluate")
    evaluate.add_argument("--model", choices=sorted(MODEL_PRESETS), help="model shape to report the predictor's cost against")
    evaluate.set_defaults(handler=cmd_eval_predictor)


def _cost_line(config, trace, model_name: str | None) -> str:
    from specmd_jax.predictor.model import count_parameters, predictor_cost
    from specmd_jax.study import model_shape_for

    try:
        shape = model_shape_for(trace, model_name)
    except ValueError as error:
        if model_name is not None:
            raise
        return f"predictor: {count_parameters(config)} parameters (no model-shape preset to compare with: {error})"
    cost = predictor_cost(config, shape)
    return (
        f"predictor: {cost.parameters} parameters = {100 * cost.parameter_fraction:.3f}% of one MoE layer of {shape.name} "
        f"({cost.moe_layer_parameters}); {cost.flops_per_token} FLOPs per token = {100 * cost.flops_fraction:.3f}% of "
        f"its {cost.moe_layer_flops_per_token}"
    )


def _describe_config(config) -> str:
    layout = "per-layer heads" if config.per_layer_heads else "shared with a layer embedding"
    hidden = f"hidden {config.hidden}" if config.hidden else "linear"
    return (
        f"model: {layout}, {hidden}, lookahead {config.lookahead}, window {config.window}, "
        f"features from {config.feature_source}, {config.loss} loss"
    )


def cmd_train_predictor(args: argparse.Namespace) -> int:
    from specmd_jax.predictor.checkpoint import check_run_directory
    from specmd_jax.predictor.evaluate import format_report
    from specmd_jax.predictor.features import feature_source, split_passes
    from specmd_jax.predictor.model import PredictorConfig
    from specmd_jax.predictor.predict import evaluate_run
    from specmd_jax.predictor.train import TrainConfig, train_predictor
    from specmd_jax.traces.io import load_any

    check_run_directory(args.out)
    trace = load_any(args.trace)
    with _options_named():
        config = PredictorConfig(
            num_layers=trace.num_layers, num_experts=trace.num_experts, lookahead=args.lookahead, window=args.window,
            feature_source=feature_source(trace), hidden=args.hidden, per_layer_heads=not args.shared, loss=args.loss,
        )
        train = TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
            weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, seed=args.seed,
            train_fraction=args.train_fraction, validation_fraction=args.validation_fraction,
        )
    try:
        split_passes(trace.num_passes, train.train_fraction, train.validation_fraction)
    except ValueError as error:
        raise ValueError(f"--train-fraction {train.train_fraction}, --validation-fraction {train.validation_fraction}: {error}") from None
    print(f"trace: {trace.name} ({trace.metadata.source}), {trace.num_passes} passes")
    print(_describe_config(config))
    print(_cost_line(config, trace, args.model))
    result = train_predictor(trace, args.out, config, train, progress=not args.quiet)
    if result.start_epoch > 1:
        print(f"resumed after epoch {result.start_epoch - 1}")
    print(
        f"trained {train.epochs} epochs into {args.out}; best validation recall@{trace.top_k} "
        f"{result.best_validation_recall:.4f} at epoch {result.best_epoch}"
    )
    print(format_report(evaluate_run(args.out, trace)))
    return 0


def cmd_eval_predictor(args: argparse.Namespace) -> int:
    from specmd_jax.predictor.checkpoint import check_trace_compatible, load_predictor
    from specmd_jax.predictor.evaluate import format_report
    from specmd_jax.predictor.predict import evaluate_run, evaluation_split
    from specmd_jax.traces.io import load_any

    loaded = load_predictor(args.checkpoint, args.kind)
    trace = load_any(args.trace)
    check_trace_compatible(loaded.config, trace, args.checkpoint)
    _, _, same_trace = evaluation_split(loaded, trace)
    print(f"checkpoint: {args.checkpoint} ({args.kind}, epoch {loaded.epoch}, validation recall@k {loaded.metadata.get('validation_recall', float('nan')):.4f})")
    print(_describe_config(loaded.config))
    print(_cost_line(loaded.config, trace, args.model))
    if not same_trace:
        print(
            f"NOTE: trace {trace.name} differs from the training trace {loaded.info.trace['name']} "
            f"({loaded.info.trace['source']}); the predictor saw none of its passes"
        )
    print(format_report(evaluate_run(loaded, trace)))
    return 0

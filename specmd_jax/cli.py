"""Command-line interface: `specmd-jax simulate`, `specmd-jax traces {stats,convert}`, `specmd-jax record` and `specmd-jax generate`."""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger("specmd_jax")

DEFAULT_TRACE = "synthetic:olmoe-1b-7b"
DEFAULT_POLICIES = "lru,fifo,lfu,least-stale,belady"
DEFAULT_CAPACITIES = "0.01,0.05,0.1,0.25,0.5"


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _parse_number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse_param_options(options: Sequence[str], policies: Sequence[str]) -> dict[str, dict[str, list]]:
    """Parse repeated `--param POLICY.NAME=V1,V2` options into {policy: {name: [values]}}."""
    grid: dict[str, dict[str, list]] = {}
    for option in options:
        target, _, values = option.partition("=")
        policy, _, name = target.partition(".")
        if not values or not name or policy not in policies:
            raise ValueError(
                f"invalid --param '{option}': expected POLICY.NAME=V1[,V2...] with POLICY one of the "
                f"selected policies ({', '.join(policies)})"
            )
        try:
            grid.setdefault(policy, {})[name] = [_parse_number(value) for value in _split(values)]
        except ValueError:
            raise ValueError(f"invalid --param '{option}': values must be numbers") from None
    return grid


def _parse_list(text: str, option: str) -> list[str]:
    """Split a comma-separated option value; an empty list or a repeated entry is an error."""
    items = _split(text)
    if not items:
        raise ValueError(f"invalid {option} '{text}': expected at least one comma-separated value")
    repeated = sorted({item for item in items if items.count(item) > 1})
    if repeated:
        raise ValueError(f"invalid {option} '{text}': {', '.join(repeated)} listed more than once")
    return items


def _parse_seeds(text: str) -> list[int]:
    seeds = []
    for item in _parse_list(text, "--seeds"):
        try:
            seeds.append(int(item))
        except ValueError:
            raise ValueError(f"invalid --seeds value '{item}': expected an integer") from None
    return seeds


def check_output_path(path: str | None, option: str) -> None:
    """Fail before any long computation when an output path cannot be written."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"invalid {option} '{path}': it is a directory; give a file path")
    if not target.parent.is_dir():
        raise ValueError(f"invalid {option} '{path}': folder '{target.parent}' not found")


def integer_at_least(low: int):
    """Return an argparse type that parses an integer >= `low`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got '{text}'") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


_positive_int = integer_at_least(1)


def _describe(trace) -> str:
    meta = trace.metadata
    lines = [
        f"trace: {trace.name} ({meta.source})",
        f"passes {trace.num_passes}, tokens {trace.num_tokens}, layers {meta.num_layers}, experts {meta.num_experts}, "
        f"top-k {meta.top_k}, missing cells {trace.num_missing_cells}",
    ]
    if meta.synthetic:
        lines.append("NOTE: synthetic trace (generated, not recorded from a model)")
    return "\n".join(lines)


def cmd_simulate(args: argparse.Namespace) -> int:
    from specmd_jax.policies.registry import get_policy
    from specmd_jax.report import format_table, write_csv
    from specmd_jax.sim.sweep import Capacity
    from specmd_jax.study import run_study
    from specmd_jax.traces.io import load_any

    policies = _parse_list(args.policies, "--policies")
    for name in policies:
        get_policy(name)
    grid = parse_param_options(args.param or [], policies)
    seeds = _parse_seeds(args.seeds)
    capacities = [Capacity.parse(text) for text in _parse_list(args.capacities, "--capacities")]
    check_output_path(args.out, "--out")

    hardware = None
    if args.hardware is not None:
        from specmd_jax.timing import get_hardware

        hardware = [get_hardware(name) for name in _parse_list(args.hardware, "--hardware")]
    elif args.model is not None:
        raise ValueError("--model sets the model shape of the timing model; give --hardware too")

    prefetchers = parse_prefetch_options(args)
    if any(prefetchers) and args.scope != "global":
        raise ValueError(f"--prefetch is simulated in global scope only, got --scope {args.scope}; use --scope global")
    if args.miss != "demand" and args.scope != "global":
        raise ValueError(f"--miss {args.miss} is simulated in global scope only, got --scope {args.scope}; use --scope global")
    if not 0 < args.train_fraction < 1:
        raise ValueError(f"invalid --train-fraction {args.train_fraction}: expected a number in (0, 1)")
    check_output_path(args.plot, "--plot")
    if args.plot is not None and not args.plot.lower().endswith(".png"):
        raise ValueError(f"invalid --plot '{args.plot}': expected a file name ending in .png")

    trace = load_any(args.trace)
    for prefetch in prefetchers:
        if prefetch is not None and not 1 <= prefetch.lookahead <= trace.num_layers:
            raise ValueError(
                f"invalid --lookahead {prefetch.lookahead}: expected 1 to {trace.num_layers} (the trace's MoE layers)"
            )
        if prefetch is not None and prefetch.top_k is not None and prefetch.top_k > trace.num_experts:
            raise ValueError(f"invalid --top-k {prefetch.top_k}: expected at most {trace.num_experts} (the trace's experts per layer)")
    print(_describe(trace))
    print(f"scope: {args.scope}" + (f", misses: {args.miss}" if args.miss != "demand" else ""))
    model = None
    if hardware is not None:
        from specmd_jax.study import model_shape_for

        model = model_shape_for(trace, args.model)
    score_tables = None
    if any(prefetch is not None and prefetch.name == "learned" for prefetch in prefetchers):
        score_tables = {"learned": learned_score_table(args.predictor, trace, prefetchers)}
    elif args.predictor is not None:
        raise ValueError("--predictor sets the table of the 'learned' prefetcher; add learned to --prefetch")
    rows, skipped = run_study(
        trace, policies, capacities, scope=args.scope, grid=grid, seeds=seeds,
        unroll=args.unroll, progress=not args.quiet, hardware=hardware, model=model,
        prefetchers=prefetchers, miss=args.miss, train_fraction=args.train_fraction, score_tables=score_tables,
    )
    print(format_table(rows, skipped))
    if not rows:
        raise ValueError("no configuration could be simulated: every capacity was skipped (see the reasons above)")
    if args.out:
        write_csv(rows, args.out)
        print(f"wrote {len(rows)} rows to {args.out}")
    if args.plot:
        from specmd_jax.plot import plot_rows

        plot_rows(rows, args.plot)
        print(f"wrote the plot to {args.plot}")
    return 0


def learned_score_table(run_dir: str | None, trace, prefetchers):
    """Return the score table of the predictor run `run_dir` for the `learned` prefetcher.

    The passes before the run's first test pass score 0, so the learned prefetcher acts only on passes
    that its training and model selection did not read. With `--train-fraction` equal to the run's
    train fraction, the trained baselines predict on the same passes.
    """
    if run_dir is None:
        raise ValueError("--prefetch learned needs --predictor DIR, a run of `specmd-jax train-predictor`")
    from specmd_jax.predictor.checkpoint import load_predictor
    from specmd_jax.predictor.predict import evaluation_split, predict_scores

    loaded = load_predictor(run_dir)
    lookahead = max(prefetch.lookahead for prefetch in prefetchers if prefetch is not None and prefetch.name == "learned")
    table = predict_scores(loaded, trace, lookahead)
    first_held_out, _, _ = evaluation_split(loaded, trace)
    table[:first_held_out] = 0.0
    print(f"learned prefetcher: predicts from pass {first_held_out} on (passes the predictor did not train on)")
    return table


def _parse_ints(text: str, option: str, low: int) -> list[int]:
    values = []
    for item in _parse_list(text, option):
        try:
            value = int(item)
        except ValueError:
            raise ValueError(f"invalid {option} value '{item}': expected an integer >= {low}") from None
        if value < low:
            raise ValueError(f"invalid {option} value '{item}': expected an integer >= {low}")
        values.append(value)
    return values


def parse_prefetch_options(args: argparse.Namespace) -> list:
    """Return the prefetch configurations of --prefetch x --lookahead x --budget x --top-k x --threshold.

    None stands for no prefetching. A parameter multiplies only the prefetchers that use it: --top-k
    the top-k selections, --threshold the mass selection.
    """
    from specmd_jax.prefetch.registry import PREFETCHER_NAMES, PREFETCHERS, PrefetchConfig

    names = _parse_list(args.prefetch, "--prefetch")
    unknown = [name for name in names if name not in PREFETCHER_NAMES]
    if unknown:
        raise ValueError(f"invalid --prefetch '{', '.join(unknown)}': expected names from {', '.join(PREFETCHER_NAMES)}")
    selections = {PREFETCHERS[name].selection for name in names if name != "none"}
    if args.top_k is not None and "top-k" not in selections:
        raise ValueError("--top-k sets the experts per target layer of the top-k prefetchers; none is in --prefetch")
    if args.threshold is not None and "mass" not in selections:
        raise ValueError("--threshold sets the probability mass of the 'score' prefetcher, which is not in --prefetch")
    if names == ["none"] and (args.lookahead != "1" or args.budget is not None):
        raise ValueError("--lookahead and --budget set prefetchers; add one to --prefetch")
    lookaheads = _parse_ints(args.lookahead, "--lookahead", 1)
    budgets = [None] if args.budget is None else _parse_ints(args.budget, "--budget", 0)
    top_ks = [None] if args.top_k is None else _parse_ints(args.top_k, "--top-k", 1)
    thresholds = [0.9]
    if args.threshold is not None:
        thresholds = []
        for item in _parse_list(args.threshold, "--threshold"):
            try:
                value = float(item)
            except ValueError:
                value = float("nan")
            if not 0 < value <= 1:
                raise ValueError(f"invalid --threshold value '{item}': expected a number in (0, 1]")
            thresholds.append(value)
    configs: list = []
    for name in names:
        if name == "none":
            configs.append(None)
            continue
        selection = PREFETCHERS[name].selection
        for lookahead, budget in itertools.product(lookaheads, budgets):
            for top_k in top_ks if selection == "top-k" else [None]:
                for threshold in thresholds if selection == "mass" else [0.9]:
                    configs.append(PrefetchConfig(name, lookahead=lookahead, top_k=top_k, threshold=threshold, budget=budget))
    return configs


def cmd_traces_stats(args: argparse.Namespace) -> int:
    import json

    from specmd_jax.traces.io import load_any
    from specmd_jax.traces.stats import compute_stats, format_stats, stats_to_dict

    stats = compute_stats(load_any(args.path))
    print(json.dumps(stats_to_dict(stats), indent=2) if args.json else format_stats(stats))
    return 0


def cmd_traces_convert(args: argparse.Namespace) -> int:
    from specmd_jax.traces.io import load_any
    from specmd_jax.traces.trace import save_trace

    check_output_path(args.out, "output path")
    trace = load_any(args.source)
    save_trace(trace, args.out)
    print(f"wrote {trace.num_passes} passes ({trace.name}) to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from specmd_jax.policies.registry import policy_names
    from specmd_jax.sim.sweep import SCOPES

    from specmd_jax.timing import HARDWARE_PRESETS, MODEL_PRESETS
    from specmd_jax.traces.synthetic import PRESETS, SPEC_OPTIONS

    parser = argparse.ArgumentParser(prog="specmd-jax", description="MoE expert-cache simulation and routing traces.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)

    defaults = argparse.ArgumentDefaultsHelpFormatter
    simulate = commands.add_parser(
        "simulate", help="sweep eviction policies x capacities over a routing trace", formatter_class=defaults,
        description="Simulate every policy at every capacity and print hit rates, misses by class and Belady's "
        "hit rate at the same capacity (the bound).",
    )
    simulate.add_argument(
        "--trace", default=DEFAULT_TRACE,
        help=f"trace file (canonical .npz, FLAME-MoE .npz, Mixtral .jsonl) or synthetic:PRESET[?key=value&...] "
        f"with presets {', '.join(sorted(PRESETS))} and options {', '.join(SPEC_OPTIONS)}",
    )
    simulate.add_argument("--policies", default=DEFAULT_POLICIES, help=f"comma-separated eviction policies, from: {', '.join(policy_names())}")
    simulate.add_argument("--capacities", default=DEFAULT_CAPACITIES, help="comma-separated capacities: fractions of all layers x experts (0.05) or slot counts (96)")
    simulate.add_argument("--scope", choices=SCOPES, default="global", help="one pool for all layers, or floor(C / L) slots per layer")
    simulate.add_argument("--param", action="append", metavar="POLICY.NAME=V1,V2", help="sweep a policy hyper-parameter (repeatable)")
    simulate.add_argument("--seeds", default="0", help="comma-separated seeds for the random policy")
    simulate.add_argument("--out", help="write the results as CSV to this path")
    simulate.add_argument(
        "--hardware",
        help="add TTFT, TPOT and stall time from the timing model for these comma-separated hardware presets, "
        f"from: {', '.join(sorted(HARDWARE_PRESETS))}",
    )
    simulate.add_argument(
        "--model", choices=sorted(MODEL_PRESETS),
        help="model shape for the timing model; it must have the trace's layers, experts and top-k "
        "(by default the one preset that does)",
    )
    from specmd_jax.prefetch.registry import DEFAULT_TRAIN_FRACTION, PREFETCHER_NAMES
    from specmd_jax.sim.prefetch import MISS_MODES

    simulate.add_argument(
        "--prefetch", default="none",
        help=f"comma-separated prefetchers, from: {', '.join(PREFETCHER_NAMES)} (see docs/semantics.md); "
        "rows also get the oracle bound (oracle prefetching with Belady eviction)",
    )
    simulate.add_argument("--lookahead", default="1", help="comma-separated lookaheads: layers ahead that a step prefetches for")
    simulate.add_argument("--budget", help="comma-separated per-step prefetch budgets in experts; unset means no limit")
    simulate.add_argument("--top-k", help="comma-separated experts per target layer for top-k prefetchers; unset means the trace's top-k")
    simulate.add_argument("--threshold", help="comma-separated probability mass per target layer for the 'score' prefetcher; unset means 0.9")
    simulate.add_argument(
        "--train-fraction", type=float, default=DEFAULT_TRAIN_FRACTION,
        help="share of the passes on which trained prefetchers (top-k, score, co-occurrence) estimate their tables",
    )
    simulate.add_argument(
        "--miss", choices=MISS_MODES, default="demand",
        help="miss handling: load the expert on demand; compute it on the host without loading it; or substitute "
        "a resident expert among the router's 2 x top-k best (needs router logits in the trace)",
    )
    simulate.add_argument("--predictor", help="run directory of `specmd-jax train-predictor` for the 'learned' prefetcher")
    simulate.add_argument("--plot", help="write hit rate (and TPOT, with --hardware) against capacity per policy to this .png file")
    simulate.add_argument("--unroll", type=_positive_int, default=1, help="scan unroll factor (speed only)")
    simulate.add_argument("--quiet", action="store_true", help="hide the progress bar")
    simulate.set_defaults(handler=cmd_simulate)

    traces = commands.add_parser("traces", help="inspect or convert routing traces")
    trace_commands = traces.add_subparsers(dest="traces_command", required=True)
    stats = trace_commands.add_parser(
        "stats", help="print routing statistics of a trace",
        description="Print passes, layers, experts, top-k and missing cells; per layer the popularity skew "
        "(max/mean load, entropy), consecutive-pass reuse against chance, next-layer top-1 predictability "
        "against the majority baseline, and the reuse-distance distribution.",
    )
    stats.add_argument("path", help="trace file or synthetic:NAME")
    stats.add_argument("--json", action="store_true", help="print JSON instead of text")
    stats.set_defaults(handler=cmd_traces_stats)
    convert = trace_commands.add_parser("convert", help="convert a trace of any supported format to the canonical .npz")
    convert.add_argument("source", help="trace file or synthetic:NAME")
    convert.add_argument("out", help="output .npz path")
    convert.set_defaults(handler=cmd_traces_convert)

    from specmd_jax.predictor.cli import add_parsers as add_predictor_parsers
    from specmd_jax.record import add_record_parser
    from specmd_jax.runtime.cli import add_parser as add_generate_parser

    add_record_parser(commands)
    add_predictor_parsers(commands)
    add_generate_parser(commands)
    return parser


def use_all_cpu_cores() -> None:
    """Ask XLA for one host device per CPU core, unless the user set a device count already.

    A simulation runs on one thread; `run_sweep` spreads configurations over these devices. This must
    run before jax is imported, so the module imports jax only inside the commands.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags and (os.cpu_count() or 1) > 1:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={os.cpu_count()}".strip()


def main(argv: Sequence[str] | None = None) -> int:
    use_all_cpu_cores()
    from specmd_jax.traces.trace import TraceError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logger.setLevel(logging.INFO)
    try:
        return args.handler(args)
    except (TraceError, ValueError) as error:
        print(f"specmd-jax: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if isinstance(error, BrokenPipeError):
            # The reader (e.g. `head`) closed the pipe; stop quietly without a second error on exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        print(f"specmd-jax: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

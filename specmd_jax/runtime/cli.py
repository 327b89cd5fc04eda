"""`specmd-jax generate`: greedy generation with offloaded experts, measured and, on an emulated link,
compared with the timing model."""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_GEN_TOKENS = 16
DEFAULT_CAPACITY = "0.05"
DEFAULT_POLICY = "least-stale"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `generate` subcommand to the CLI's subparsers."""
    from specmd_jax.policies.registry import policy_names
    from specmd_jax.prefetch.registry import DEFAULT_THRESHOLD, DEFAULT_TRAIN_FRACTION
    from specmd_jax.runtime.generate import PREFETCHERS

    parser = subparsers.add_parser(
        "generate", help="generate text with the experts offloaded to host memory and a device cache of expert slots",
        description="Run greedy generation layer by layer with a fixed-size device cache of expert slots, decided by "
        "an eviction policy of the simulator, and report TTFT, TPOT, hit rate, bytes moved and stall time. With "
        "--link-bandwidth the transfers go over an emulated link, and the timing model's prediction is printed beside "
        "the measurement. TTFT is the timing model's: the prefill passes plus the first decode pass.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="DIR", help="Hugging Face checkpoint directory or a train_tiny_moe run directory")
    source.add_argument("--model", metavar="NAME", help="architecture preset with random weights, for smoke tests")
    parser.add_argument("--prompt", required=True, metavar="FILE", help="UTF-8 text file with the prompt")
    parser.add_argument("--prompt-tokens", type=int, metavar="N", help="use the first N tokens of the prompt (default: all)")
    parser.add_argument("--gen-tokens", type=int, default=DEFAULT_GEN_TOKENS, metavar="M", help=f"tokens to generate (default {DEFAULT_GEN_TOKENS})")
    parser.add_argument("--capacity", default=DEFAULT_CAPACITY, help=f"cache slots: a fraction of all layers x experts (0.05) or a slot count (96) (default {DEFAULT_CAPACITY})")
    parser.add_argument("--policy", default=DEFAULT_POLICY, choices=policy_names(), help=f"eviction policy (default {DEFAULT_POLICY}); belady needs --replay")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random policy and of --model's initialisation (default 0)")
    parser.add_argument(
        "--prefetch", default="none", choices=PREFETCHERS,
        help="prefetcher (default none): gate runs the next layer's router on this layer's input during the run; the "
        "others are the simulator's prefetchers (see docs/semantics.md), which build their score tables from the trace "
        "given with --replay and make the simulator's decisions on it",
    )
    parser.add_argument(
        "--prefetch-budget", type=int, metavar="N",
        help="maximum prefetches per step (default: no limit)",
    )
    parser.add_argument("--prefetch-lookahead", type=int, default=1, metavar="D", help="steps ahead a replayed prefetcher scores, 1 .. the MoE layers; gate needs 1 (default 1)")
    parser.add_argument("--prefetch-top-k", type=int, metavar="K", help="experts per target step for the top-k prefetchers: gate, top-k, co-occurrence, gate-speculative, learned (default: the model's top-k)")
    parser.add_argument("--prefetch-threshold", type=float, metavar="SHARE", help=f"score share per target step for the 'score' prefetcher, in (0, 1] (default {DEFAULT_THRESHOLD})")
    parser.add_argument(
        "--train-fraction", type=float, default=DEFAULT_TRAIN_FRACTION, metavar="SHARE",
        help=f"share of the replayed passes on which top-k, score and co-occurrence estimate their tables, in (0, 1) (default {DEFAULT_TRAIN_FRACTION})",
    )
    parser.add_argument("--predictor", metavar="DIR", help="run directory of `specmd-jax train-predictor`: the score table of the 'learned' prefetcher")
    parser.add_argument("--link-bandwidth", type=float, metavar="GB/s", help="emulate a host-to-device link of this bandwidth (1 GB/s = 1e9 bytes/s) and compare with the timing model")
    parser.add_argument("--link-latency", type=float, default=0.0, metavar="US", help="fixed cost of each emulated transfer, microseconds (default 0)")
    parser.add_argument("--device", type=int, default=0, metavar="INDEX", help="index in jax.devices() of the device for the expert cache and the model (default 0)")
    parser.add_argument("--prefill-chunk", type=int, metavar="N", help="run the prompt as prefill passes of at most N tokens (default: one pass)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="float32", help="parameter dtype for --model and imported checkpoints (default float32)")
    parser.add_argument("--replay", metavar="TRACE.npz", help="trace recorded by --save-trace with the same model, prompt and passes: gives Belady the future requests and the prefetchers other than gate their score tables")
    parser.add_argument("--save-trace", metavar="TRACE.npz", help="write the routing of the measured run as a canonical trace")
    parser.add_argument("--repeats", type=int, default=1, metavar="N", help="measured runs (and as many free-link calibration runs with --link-bandwidth); each pass time and stall is the median over them (default 1)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed first run that compiles every piece (the first run then includes compile time)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to this path")
    parser.set_defaults(handler=cmd_generate)
    return parser


def _check_args(args: argparse.Namespace) -> None:
    for flag, value, low in (
        ("--gen-tokens", args.gen_tokens, 1), ("--repeats", args.repeats, 1), ("--prefetch-lookahead", args.prefetch_lookahead, 1),
        ("--prompt-tokens", args.prompt_tokens, 1), ("--prefill-chunk", args.prefill_chunk, 1), ("--prefetch-budget", args.prefetch_budget, 0),
        ("--device", args.device, 0),
    ):
        if value is not None and value < low:
            raise ValueError(f"invalid {flag} {value}: expected an integer >= {low}")
    if args.link_bandwidth is not None and not (math.isfinite(args.link_bandwidth) and args.link_bandwidth > 0):
        raise ValueError(f"invalid --link-bandwidth {args.link_bandwidth}: expected GB/s > 0")
    if not (math.isfinite(args.link_latency) and args.link_latency >= 0):
        raise ValueError(f"invalid --link-latency {args.link_latency}: expected microseconds >= 0")
    if args.link_latency and args.link_bandwidth is None:
        raise ValueError("--link-latency sets the emulated link; give --link-bandwidth too")
    if args.policy == "belady" and args.replay is None:
        raise ValueError("--policy belady needs the future requests, which a live run does not know: record a trace with --save-trace and pass it with --replay")
    _check_prefetch_args(args)
    for flag, path in (("--save-trace", args.save_trace), ("--json", args.json)):
        if path is not None and (Path(path).is_dir() or not Path(path).parent.is_dir()):
            raise ValueError(f"invalid {flag} '{path}': expected a file path in an existing folder")


def _check_prefetch_args(args: argparse.Namespace) -> None:
    from specmd_jax.prefetch.registry import PREFETCHERS as TABLE_PREFETCHERS

    name = args.prefetch
    if name not in ("none", "gate") and args.replay is None:
        raise ValueError(
            f"--prefetch {name} builds its score table from a recorded trace: record a trace with --save-trace and pass it with --replay"
        )
    selection = None  # none selects nothing
    if name == "gate":
        selection = "top-k"
    elif name in TABLE_PREFETCHERS:
        selection = TABLE_PREFETCHERS[name].selection
    if args.prefetch_top_k is not None:
        if args.prefetch_top_k < 1:
            raise ValueError(f"invalid --prefetch-top-k {args.prefetch_top_k}: expected an integer >= 1")
        if selection != "top-k":
            raise ValueError(f"--prefetch-top-k sets the top-k selection, but --prefetch {name} does not use it")
    if args.prefetch_threshold is not None:
        if not 0 < args.prefetch_threshold <= 1:
            raise ValueError(f"invalid --prefetch-threshold {args.prefetch_threshold}: expected a number in (0, 1]")
        if selection != "mass":
            raise ValueError(f"--prefetch-threshold sets the mass selection of the 'score' prefetcher, but --prefetch is {name}")
    if not 0 < args.train_fraction < 1:
        raise ValueError(f"invalid --train-fraction {args.train_fraction}: expected a number in (0, 1)")
    if name == "gate" and args.prefetch_lookahead != 1:
        raise ValueError(f"invalid --prefetch-lookahead {args.prefetch_lookahead}: gate proposes experts of the next MoE layer only, so it needs 1")
    if name == "learned" and args.predictor is None:
        raise ValueError("--prefetch learned needs --predictor DIR, a run of `specmd-jax train-predictor`")
    if args.predictor is not None and name != "learned":
        raise ValueError(f"--predictor sets the score table of the 'learned' prefetcher, but --prefetch is {name}")


def _read_prompt(path: str, tokenizer, prompt_tokens: int | None, vocab_size: int) -> np.ndarray:
    prompt_path = Path(path)
    if not prompt_path.is_file():
        raise FileNotFoundError(f"{prompt_path}: prompt file not found")
    try:
        text = prompt_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{prompt_path}: not valid UTF-8 at byte {error.start}; convert the prompt to UTF-8") from None
    tokens = tokenizer.encode(text)
    if prompt_tokens is not None:
        if tokens.size < prompt_tokens:
            raise ValueError(f"{prompt_path}: the prompt has {tokens.size} tokens, fewer than --prompt-tokens {prompt_tokens}")
        tokens = tokens[:prompt_tokens]
    if tokens.size == 0:
        raise ValueError(f"{prompt_path}: the prompt is empty")
    if int(tokens.max()) >= vocab_size:
        raise ValueError(f"the tokenizer produces token id {int(tokens.max())}, but the model's vocab_size is {vocab_size}")
    return tokens[None, :].astype(np.int32)


def _pick_device(index: int):
    import jax

    devices = jax.devices()
    if index >= len(devices):
        raise ValueError(
            f"invalid --device {index}: this process has {len(devices)} devices ({', '.join(str(d) for d in devices)}); "
            "on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N for more"
        )
    return devices[index]


def _prefetch_label(args: argparse.Namespace) -> str:
    """Return the prefetcher's name with the settings its selection uses, as the simulator labels it."""
    from specmd_jax.prefetch.registry import DEFAULT_THRESHOLD, PREFETCHERS, PrefetchConfig

    if args.prefetch not in PREFETCHERS:
        return args.prefetch
    threshold = DEFAULT_THRESHOLD if args.prefetch_threshold is None else args.prefetch_threshold
    return PrefetchConfig(
        args.prefetch, lookahead=args.prefetch_lookahead, top_k=args.prefetch_top_k, threshold=threshold, budget=args.prefetch_budget,
    ).label


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.2f} ms"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:+.1f}%"


def cmd_generate(args: argparse.Namespace) -> int:
    """Run `specmd-jax generate`."""
    from specmd_jax.prefetch.registry import DEFAULT_THRESHOLD
    from specmd_jax.record import load_model
    from specmd_jax.runtime.execution import OffloadedModel
    from specmd_jax.runtime.generate import median_run, offloaded_generate
    from specmd_jax.runtime.link import Link
    from specmd_jax.runtime.timing import comparison_rows, describe_outcomes, fit_compute, model_shape_for, modelled_timing
    from specmd_jax.sim.sweep import Capacity
    from specmd_jax.traces.trace import load_trace, save_trace

    _check_args(args)
    capacity_option = Capacity.parse(args.capacity)
    replay = load_trace(args.replay) if args.replay else None
    device = _pick_device(args.device)
    model, tokenizer, model_name = load_model(args.checkpoint, args.model, args.dtype, args.seed)
    prompt = _read_prompt(args.prompt, tokenizer, args.prompt_tokens, model.config.vocab_size)
    config = model.config
    slots = capacity_option.slots(config.num_moe_layers, config.num_experts)
    offloaded = OffloadedModel(model, device)
    del model

    score_tables = None
    if args.predictor is not None:
        from specmd_jax.predictor.predict import predict_scores

        # Every replayed pass is scored, unlike `simulate --prefetch learned`, which scores only the passes after
        # the predictor's training and validation share.
        score_tables = {"learned": predict_scores(args.predictor, replay, args.prefetch_lookahead)}
    settings = dict(
        policy=args.policy, capacity=slots, seed=args.seed, prefetch=args.prefetch, prefetch_budget=args.prefetch_budget,
        prefetch_lookahead=args.prefetch_lookahead, prefetch_top_k=args.prefetch_top_k,
        prefetch_threshold=DEFAULT_THRESHOLD if args.prefetch_threshold is None else args.prefetch_threshold,
        train_fraction=args.train_fraction, score_tables=score_tables, prefill_chunk=args.prefill_chunk, replay=replay,
        model_name=model_name,
    )

    def run(bandwidth: float | None):
        latency = args.link_latency * 1e-6 if bandwidth is not None else 0.0
        return offloaded_generate(offloaded, prompt, args.gen_tokens, link=Link(device, bandwidth, latency), **settings)

    if not args.no_warmup:
        logger.info("warm-up run (compiles every piece)")
        run(None)
    bandwidth = None if args.link_bandwidth is None else args.link_bandwidth * 1e9
    calibration_runs, measured_runs = [], []
    for _ in range(args.repeats):
        # Calibration and measured runs alternate, so a change in the machine's load affects both alike.
        if bandwidth is not None:
            calibration_runs.append(run(None))
        measured_runs.append(run(bandwidth))
    measured = median_run(measured_runs)
    fit = None
    if bandwidth is not None:
        shape = model_shape_for(config)
        fit = fit_compute(median_run(calibration_runs), shape)

    total_items = config.num_moe_layers * config.num_experts
    link_text = "free (no emulation)" if bandwidth is None else f"emulated {args.link_bandwidth:g} GB/s, latency {args.link_latency:g} us"
    print(f"model: {model_name}, {config.num_moe_layers} MoE layers x {config.num_experts} experts, top-{config.top_k}, {config.dtype}")
    print(f"device: {device}; policy {measured.policy}; capacity {slots} of {total_items} experts ({capacity_option}); prefetch {_prefetch_label(args)}; link {link_text}")
    print(f"prompt {prompt.shape[1]} tokens in {int((measured.trace.pass_kind == 0).sum())} prefill passes; {args.gen_tokens} tokens generated")
    if hasattr(tokenizer, "decode"):
        print(f"output: {tokenizer.decode(measured.tokens[0])!r}")
    print(describe_outcomes(measured))
    summary = {
        "model": model_name, "device": str(device), "policy": measured.policy, "capacity": slots, "prefetch": args.prefetch,
        "link_bandwidth_gbs": args.link_bandwidth, "link_latency_us": args.link_latency, "prompt_tokens": int(prompt.shape[1]),
        "gen_tokens": args.gen_tokens, "tokens": measured.tokens[0].tolist(), "requests": measured.requests, "hits": measured.hits, "hit_rate": measured.hit_rate,
        "transfers": len(measured.transfers), "prefetches": sum(r.prefetched.size for r in measured.records), "bytes_moved": measured.bytes_moved, "ttft_s": measured.ttft,
        "tpot_s": measured.tpot, "stall_s": measured.total_stall, "transfer_overhead_s": float(sum(r.transfer_overhead for r in measured.records)),
    }
    if fit is None:
        print(f"TTFT {_seconds(measured.ttft)}, TPOT {_seconds(measured.tpot)}, stall {_seconds(measured.total_stall)}")
    else:
        modelled = modelled_timing(measured, fit.hardware(bandwidth, args.link_latency * 1e-6), shape)
        note = " (NOTE: a fitted figure is at its search bound)" if fit.at_bound else ""
        print(
            f"timing model: compute fitted to a free-link run: peak {fit.peak_flops:.3g} FLOP/s, "
            f"memory {fit.memory_bandwidth:.3g} B/s{note}"
        )
        print(f"{'':8}{'measured':>14}{'modelled':>14}{'error':>9}")
        rows = comparison_rows(measured, modelled)
        for name, observed, estimate, error in rows:
            print(f"{name:8}{_seconds(observed):>14}{_seconds(estimate):>14}{_percent(error):>9}")
        summary["fit"] = {"peak_flops": fit.peak_flops, "memory_bandwidth": fit.memory_bandwidth, "at_bound": fit.at_bound}
        summary["modelled"] = {name.lower(): estimate for name, _, estimate, _ in rows}
    if args.save_trace:
        save_trace(measured.trace, args.save_trace)
        print(f"wrote the routing of {measured.trace.num_passes} passes to {args.save_trace}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0

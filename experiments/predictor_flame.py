"""Train and evaluate the learned next-layer predictor on a trace, and compare model layouts.

Steps, all on the same pass split (first 75% of passes for training and validation, the rest for test):
1. train the default predictor (per-layer linear heads, window 3, lookahead 3) and print its cost next
   to one MoE layer and its test tables against the free baselines;
2. train it again with the same seed and check that the saved parameters are identical;
3. train it with two more seeds and count the layer pairs where it beats the best baseline;
4. compare layouts (shared with a layer embedding against per-layer heads, linear and with a hidden
   layer) by validation recall@k, the selection criterion, and report test recall@k next to it.

Example (3 minutes on 2 shared CPU cores):
  python experiments/predictor_flame.py \\
      --trace ../shared/data/flame-moe-290m_dynande-sample/flame_moe_290m_iter5473_seq2048.npz --runs runs/predictor
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from specmd_jax.predictor.checkpoint import LATEST, load_predictor
from specmd_jax.predictor.evaluate import LEARNED, format_report
from specmd_jax.predictor.features import feature_source
from specmd_jax.predictor.model import PredictorConfig, predictor_cost
from specmd_jax.predictor.predict import evaluate_run
from specmd_jax.predictor.train import TrainConfig, train_predictor
from specmd_jax.study import model_shape_for
from specmd_jax.traces.io import load_any

logger = logging.getLogger("predictor_flame")

LAYOUTS = {
    "shared, linear": {"per_layer_heads": False, "hidden": 0},
    "shared, hidden 256": {"per_layer_heads": False, "hidden": 256},
    "shared, hidden 1024": {"per_layer_heads": False, "hidden": 1024},
    "per-layer heads, linear": {"per_layer_heads": True, "hidden": 0},
    "per-layer heads, hidden 256": {"per_layer_heads": True, "hidden": 256},
}


def parameters(directory: Path, kind: str) -> list[np.ndarray]:
    model = load_predictor(directory, kind).model
    return [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))]


def train_run(trace, directory: Path, config: PredictorConfig, train: TrainConfig):
    started = time.perf_counter()
    result = train_predictor(trace, directory, config, train)
    report = evaluate_run(directory, trace)
    logger.info("trained %s in %.1f s", directory, time.perf_counter() - started)
    return result, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", required=True, help="trace file, e.g. the FLAME-MoE-290M sample")
    parser.add_argument("--runs", required=True, help="folder for the run directories (must not contain earlier runs)")
    parser.add_argument("--epochs", type=int, default=TrainConfig().epochs, help="training epochs of every run")
    parser.add_argument("--skip-layouts", action="store_true", help="skip step 4, the layout comparison")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    for name in ("absl", "orbax", "specmd_jax"):
        logging.getLogger(name).setLevel(logging.WARNING)

    runs = Path(args.runs)
    if runs.exists() and any(runs.iterdir()):
        raise SystemExit(f"{runs}: folder not empty; give a new --runs folder so no earlier run is resumed")
    trace = load_any(args.trace)
    base = PredictorConfig(trace.num_layers, trace.num_experts, feature_source=feature_source(trace))
    train = TrainConfig(epochs=args.epochs)

    # 1. The default predictor.
    result, report = train_run(trace, runs / "seed0", base, train)
    cost = predictor_cost(base, model_shape_for(trace, None))
    print(f"trace {trace.name}: {trace.num_passes} passes; {base}")
    print(f"train {train}")
    print(
        f"cost: {cost.parameters} parameters = {100 * cost.parameter_fraction:.3f}% of one MoE layer "
        f"({cost.moe_layer_parameters}); {cost.flops_per_token} FLOPs per token = {100 * cost.flops_fraction:.3f}% "
        f"of {cost.moe_layer_flops_per_token}"
    )
    print(f"best validation recall@k {result.best_validation_recall:.4f} at epoch {result.best_epoch}")
    print(format_report(report))

    # 2. Determinism: the same seed gives the same parameters.
    train_predictor(trace, runs / "seed0-again", base, train)
    identical = all(
        np.array_equal(left, right)
        for kind in ("best", LATEST)
        for left, right in zip(parameters(runs / "seed0", kind), parameters(runs / "seed0-again", kind), strict=True)
    )
    print(f"\nsame seed, second run: parameters identical = {identical}")

    # 3. Other seeds.
    print("\nseed  best epoch  validation recall@k  test recall@k (same pass)  pairs won (same pass)  pairs won (next pass)")
    for seed in (0, 1, 2):
        if seed == 0:
            seed_result, seed_report = result, report
        else:
            seed_train = dataclasses.replace(train, seed=seed)
            seed_result, seed_report = train_run(trace, runs / f"seed{seed}", base, seed_train)
        same = seed_report.same_pass_pairs
        wins = seed_report.learned_wins()
        print(
            f"{seed:>4}  {seed_result.best_epoch:>10}  {seed_result.best_validation_recall:>19.4f}  "
            f"{seed_report.methods[LEARNED].mean('recall@k', same):>25.4f}  "
            f"{int(wins[same].sum()):>10} of {int(same.sum()):<8}  {int(wins[~same].sum()):>10} of {int((~same).sum())}"
        )

    if args.skip_layouts:
        return 0

    # 4. Layouts, chosen by validation recall@k.
    print("\nlayout                         parameters  % of MoE layer  FLOPs % of MoE layer  validation recall@k  test recall@k (same pass)  test recall@k (next pass)")
    for label, changes in LAYOUTS.items():
        config = dataclasses.replace(base, **changes)
        directory = runs / label.replace(", ", "-").replace(" ", "-")
        layout_result, layout_report = train_run(trace, directory, config, train)
        layout_cost = predictor_cost(config, model_shape_for(trace, None))
        same = layout_report.same_pass_pairs
        learned = layout_report.methods[LEARNED]
        print(
            f"{label:<30} {layout_cost.parameters:>10}  {100 * layout_cost.parameter_fraction:>14.3f}  "
            f"{100 * layout_cost.flops_fraction:>20.3f}  {layout_result.best_validation_recall:>19.4f}  "
            f"{learned.mean('recall@k', same):>25.4f}  {learned.mean('recall@k', ~same):>25.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Short run of experiments/train_tiny_moe.py: train, checkpoint, resume, record, simulate."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SHARED_DATA, require_shared
from specmd_jax.cli import main as cli_main
from specmd_jax.model.orbax_io import checkpoint_manager, restore_step
from specmd_jax.record import load_model
from specmd_jax.traces.trace import load_trace

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "train_tiny_moe.py"
TEXTS = SHARED_DATA / "olmoe-mixtral_allenai-routing-analysis" / "texts"
SMALL = ["--batch", "2", "--seq-len", "32", "--layers", "2", "--experts", "8", "--top-k", "2", "--save-every", "2", "--quiet"]


def load_script():
    spec = importlib.util.spec_from_file_location("train_tiny_moe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_resume_record_simulate(tmp_path, capsys):
    text = require_shared(TEXTS / "wikipedia_texts.txt")
    script = load_script()
    run_dir = tmp_path / "run"

    first = script.main(["--text", str(text), "--run-dir", str(run_dir), "--steps", "2", *SMALL])
    assert first["start_step"] == 0
    assert len(first["losses"]) == 2
    saved_model, _, metadata, step = restore_step(run_dir)
    assert step == 2
    assert metadata["step"] == 2

    # Resume: training continues from step 2 and the data of a step does not depend on resuming.
    out = tmp_path / "tiny.npz"
    second = script.main([
        "--text", str(text), "--run-dir", str(run_dir), "--steps", "4", *SMALL,
        "--record-out", str(out), "--prompt-tokens", "24", "--gen-tokens", "3", "--sequences", "2",
    ])
    assert second["start_step"] == 2
    assert len(second["losses"]) == 2
    assert checkpoint_manager(run_dir).latest_step() == 4
    resumed_model, _, _, _ = restore_step(run_dir)
    tokens = jnp.arange(10, dtype=jnp.int32)[None, :]
    assert not np.allclose(np.asarray(resumed_model(tokens)), np.asarray(saved_model(tokens)))
    np.testing.assert_array_equal(
        script.sample_batch(np.arange(1000), 3, 2, 8, 0), script.sample_batch(np.arange(1000), 3, 2, 8, 0)
    )

    trace = load_trace(out)
    assert trace.num_passes == 2 * 4
    assert trace.metadata.num_experts == 8
    assert "step 4" in trace.metadata.model

    # The run directory is also a --checkpoint for `specmd-jax record`.
    model, _, name = load_model(str(run_dir), None, "float32")
    assert "step 4" in name
    np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(resumed_model(tokens)))

    assert cli_main(["simulate", "--trace", str(out), "--policies", "lru,fifo", "--capacities", "0.5,1.0", "--quiet"]) == 0
    assert "lru" in capsys.readouterr().out


def test_load_balancing_loss_uniform_is_one():
    script = load_script()
    # 4 experts, top-1, every expert picked once with uniform probabilities: E * sum(1/4 * 1/4) = 1.
    logits = jnp.zeros((1, 4, 1, 4))
    ids = jnp.arange(4).reshape(1, 4, 1, 1)
    assert float(script.load_balancing_loss(logits, ids, 4)) == pytest.approx(1.0)
    # All tokens on expert 0 with probability near 1: loss near E = 4.
    skewed = jnp.zeros((1, 4, 1, 4)).at[..., 0].set(30.0)
    assert float(script.load_balancing_loss(skewed, jnp.zeros((1, 4, 1, 1), jnp.int32), 4)) == pytest.approx(4.0, rel=1e-3)

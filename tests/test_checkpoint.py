"""Tests of the Hugging Face checkpoint import on tiny random checkpoints written with numpy only."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="checkpoint import needs safetensors")

from specmd_jax.checkpoints import (  # noqa: E402
    CheckpointError, config_from_hf, expected_tensors, load_hf_checkpoint,
)
from specmd_jax.model import MoeTransformer  # noqa: E402

HF_CONFIGS = {
    "olmoe": dict(model_type="olmoe", vocab_size=40, hidden_size=16, intermediate_size=8, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                  rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=64),
    "mixtral": dict(model_type="mixtral", vocab_size=40, hidden_size=16, intermediate_size=8, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                    rope_parameters={"rope_theta": 1e6, "rope_type": "default"}, sliding_window=None,
                    max_position_embeddings=64),
    "qwen2_moe": dict(model_type="qwen2_moe", vocab_size=40, hidden_size=16, intermediate_size=24,
                      moe_intermediate_size=8, shared_expert_intermediate_size=12, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                      rope_theta=1e6, max_position_embeddings=64),
}


def export_tensors(model: MoeTransformer, model_type: str, fused: bool = False) -> dict[str, np.ndarray]:
    """Write the model's parameters under Hugging Face names (the inverse of the import table)."""
    params = {path: np.asarray(v[...], np.float32) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    available = {f"model.layers.{i}.mlp.experts.gate_up_proj" for i in range(model.config.num_layers)} if fused else set()
    tensors: dict[str, np.ndarray] = {}
    for spec in expected_tensors(model.config, model_type, available):
        value = params[spec.target]
        if spec.expert is not None:
            value = value[spec.expert]
        if spec.transpose:
            value = np.swapaxes(value, -1, -2)
        if spec.rows is not None:
            # Fused gate_up: gate rows first, then up rows, on axis 1.
            stored = tensors.setdefault(spec.name, np.zeros(spec.shape, np.float32))
            stored[:, spec.rows] = value
            continue
        tensors[spec.name] = np.ascontiguousarray(value)
    return tensors


def write_checkpoint(directory: Path, hf_config: dict, tensors: dict[str, np.ndarray], shards: int = 1) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config))
    names = sorted(tensors)
    if shards == 1:
        safetensors_numpy.save_file(tensors, str(directory / "model.safetensors"))
        return directory
    weight_map = {}
    for shard in range(shards):
        file_name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[shard::shards]}
        safetensors_numpy.save_file(part, str(directory / file_name))
        weight_map.update({name: file_name for name in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def random_model(model_type: str, seed: int = 0) -> MoeTransformer:
    config = config_from_hf(HF_CONFIGS[model_type], dtype="float32")
    return MoeTransformer(config, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("model_type", sorted(HF_CONFIGS))
def test_import_round_trip(tmp_path, model_type):
    model = random_model(model_type)
    directory = write_checkpoint(tmp_path / model_type, HF_CONFIGS[model_type], export_tensors(model, model_type), shards=2)
    loaded = load_hf_checkpoint(directory, dtype="float32")
    tokens = jnp.arange(7, dtype=jnp.int32)[None, :]
    np.testing.assert_array_equal(np.asarray(loaded(tokens)), np.asarray(model(tokens)))


def test_import_fused_expert_layout(tmp_path):
    model = random_model("olmoe", seed=1)
    tensors = export_tensors(model, "olmoe", fused=True)
    assert "model.layers.0.mlp.experts.gate_up_proj" in tensors
    loaded = load_hf_checkpoint(write_checkpoint(tmp_path, HF_CONFIGS["olmoe"], tensors), dtype="float32")
    tokens = jnp.arange(5, dtype=jnp.int32)[None, :]
    np.testing.assert_array_equal(np.asarray(loaded(tokens)), np.asarray(model(tokens)))


def test_import_bfloat16_tensors(tmp_path):
    model = random_model("mixtral")
    tensors = {name: value.astype(ml_dtypes.bfloat16) for name, value in export_tensors(model, "mixtral").items()}
    loaded = load_hf_checkpoint(write_checkpoint(tmp_path, HF_CONFIGS["mixtral"], tensors), dtype="bfloat16")
    router = loaded.layers[1].mlp.router.kernel[...]
    assert router.dtype == jnp.bfloat16
    expected = tensors["model.layers.1.block_sparse_moe.gate.weight"].T
    np.testing.assert_array_equal(np.asarray(router), expected)


@pytest.fixture
def olmoe_tensors() -> dict[str, np.ndarray]:
    return export_tensors(random_model("olmoe"), "olmoe")


def test_missing_tensor_named(tmp_path, olmoe_tensors):
    del olmoe_tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    directory = write_checkpoint(tmp_path, HF_CONFIGS["olmoe"], olmoe_tensors)
    with pytest.raises(CheckpointError) as error:
        load_hf_checkpoint(directory)
    assert "'model.layers.1.mlp.experts.3.up_proj.weight' not found" in str(error.value)
    assert "expected shape (8, 16)" in str(error.value)


def test_wrong_shape_names_both_shapes(tmp_path, olmoe_tensors):
    olmoe_tensors["model.layers.0.mlp.gate.weight"] = np.zeros((5, 16), np.float32)
    directory = write_checkpoint(tmp_path, HF_CONFIGS["olmoe"], olmoe_tensors)
    with pytest.raises(CheckpointError) as error:
        load_hf_checkpoint(directory)
    message = str(error.value)
    assert "'model.layers.0.mlp.gate.weight'" in message
    assert "expected shape (4, 16)" in message
    assert "found shape (5, 16)" in message


def test_config_mismatch_extra_layer(tmp_path, olmoe_tensors):
    config = dict(HF_CONFIGS["olmoe"], num_hidden_layers=1)
    directory = write_checkpoint(tmp_path, config, olmoe_tensors)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.1\..*' .*not part of the model"):
        load_hf_checkpoint(directory)


def test_integer_tensor_rejected(tmp_path, olmoe_tensors):
    olmoe_tensors["model.norm.weight"] = np.ones(16, np.int32)
    directory = write_checkpoint(tmp_path, HF_CONFIGS["olmoe"], olmoe_tensors)
    with pytest.raises(CheckpointError, match=r"'model.norm.weight': expected a float dtype .* found I32"):
        load_hf_checkpoint(directory)


def test_truncated_file_rejected(tmp_path, olmoe_tensors):
    directory = write_checkpoint(tmp_path, HF_CONFIGS["olmoe"], olmoe_tensors)
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf_checkpoint(directory)


def test_garbage_header_rejected(tmp_path):
    directory = tmp_path / "garbage"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(HF_CONFIGS["olmoe"]))
    (directory / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_hf_checkpoint(directory)


def test_index_lists_absent_shard(tmp_path, olmoe_tensors):
    directory = write_checkpoint(tmp_path, HF_CONFIGS["olmoe"], olmoe_tensors, shards=2)
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: file not found"):
        load_hf_checkpoint(directory)


def test_config_errors(tmp_path):
    with pytest.raises(CheckpointError, match="model_type 'llama' is not supported"):
        config_from_hf({"model_type": "llama"})
    with pytest.raises(CheckpointError, match="key 'num_experts_per_tok' not found"):
        config_from_hf({k: v for k, v in HF_CONFIGS["olmoe"].items() if k != "num_experts_per_tok"})
    with pytest.raises(CheckpointError, match="rope type 'yarn'"):
        config_from_hf(dict(HF_CONFIGS["olmoe"], rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(CheckpointError, match="config.json: file not found"):
        load_hf_checkpoint(tmp_path)


def test_config_sliding_window_caps_length():
    config = config_from_hf(dict(HF_CONFIGS["mixtral"], sliding_window=32))
    assert config.max_seq_len == 32

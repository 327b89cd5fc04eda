"""Import Hugging Face safetensors checkpoints of OLMoE, Mixtral, Qwen2-MoE and Qwen3-MoE.

Loading is from a local directory only: `config.json` plus one `*.safetensors` file or several
shards listed in `model.safetensors.index.json`. Every tensor is checked (name, shape, float dtype)
from the file headers before any data is read. Tensors are then read one at a time with
`safetensors.safe_open`, converted to the target dtype and placed into an abstract model. Peak
memory is therefore the finished model plus one parameter's buffer, at most one layer's stacked
experts (64 x 2048 x 1024 x 2 bytes = 0.27 GB per projection for OLMoE-1B-7B in bf16).

Both expert layouts are accepted: one tensor per expert (`experts.{e}.gate_proj.weight`, as
published and as `save_pretrained` of transformers 5.25 writes), and fused per-layer tensors
(`experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I]).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from specmd_jax.model.config import DTYPES, ModelConfig
from specmd_jax.model.transformer import MoeTransformer

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe")
_FLOAT_DTYPES = {"F32", "BF16", "F16"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved; recomputed here


class CheckpointError(ValueError):
    """A checkpoint that cannot be imported; the message names the file or tensor and what was expected."""


# ---------------------------------------------------------------------------------------------
# config.json -> ModelConfig


def _require(hf: dict[str, Any], key: str, origin: str) -> Any:
    if key not in hf or hf[key] is None:
        raise CheckpointError(f"{origin}: key '{key}' not found; the config of this model type needs it")
    return hf[key]


def _rope_theta(hf: dict[str, Any], origin: str) -> float:
    """RoPE base from `rope_parameters` (transformers 5) or `rope_theta` (older configs); only plain RoPE."""
    parameters = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = parameters.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise CheckpointError(f"{origin}: rope type '{rope_type}' is not supported; expected plain RoPE ('default')")
    theta = parameters.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise CheckpointError(f"{origin}: RoPE base not found (expected 'rope_parameters.rope_theta' or 'rope_theta')")
    return float(theta)


def _max_seq_len(hf: dict[str, Any], sliding_window: int | None) -> int:
    length = int(hf.get("max_position_embeddings") or 4096)
    if sliding_window is not None and sliding_window < length:
        # NOTE: this model has no sliding-window attention. Capping the sequence length at the
        # window keeps its full causal attention exact; longer sequences are rejected by generation.
        logger.warning("sliding_window=%d: sequences are limited to %d tokens", sliding_window, sliding_window)
        return int(sliding_window)
    return length


def config_from_hf(hf: dict[str, Any], dtype: str = "bfloat16", origin: str = "config.json") -> ModelConfig:
    """Translate a Hugging Face `config.json` dictionary into a `ModelConfig`."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{origin}: model_type {model_type!r} is not supported; expected one of {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{origin}: hidden_act {hf.get('hidden_act')!r} is not supported; expected 'silu'")
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; expected one of {DTYPES}")

    hidden = int(_require(hf, "hidden_size", origin))
    heads = int(_require(hf, "num_attention_heads", origin))
    num_layers = int(_require(hf, "num_hidden_layers", origin))
    num_experts = hf.get("num_experts") if model_type != "mixtral" else None
    num_experts = int(num_experts or _require(hf, "num_local_experts", origin))
    fields: dict[str, Any] = dict(
        name=hf.get("_name_or_path") or model_type,
        vocab_size=int(_require(hf, "vocab_size", origin)),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        num_experts=num_experts,
        top_k=int(_require(hf, "num_experts_per_tok", origin)),
        rope_theta=_rope_theta(hf, origin),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dtype=dtype,
    )
    sliding_window = None
    if model_type == "olmoe":
        fields.update(
            expert_hidden_size=int(_require(hf, "intermediate_size", origin)),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            qk_norm="full",
            clip_qkv=hf.get("clip_qkv"),
            attention_bias=bool(hf.get("attention_bias", False)),
        )
    elif model_type == "mixtral":
        fields.update(expert_hidden_size=int(_require(hf, "intermediate_size", origin)), norm_topk_prob=True)
        sliding_window = hf.get("sliding_window")
    else:
        fields.update(
            expert_hidden_size=int(_require(hf, "moe_intermediate_size", origin)),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        )
        if hf.get("use_sliding_window"):
            sliding_window = hf.get("sliding_window")
        step = int(hf.get("decoder_sparse_step") or 1)
        mlp_only = set(hf.get("mlp_only_layers") or [])
        dense = tuple(i for i in range(num_layers) if i in mlp_only or (i + 1) % step != 0)
        if dense:
            fields.update(dense_layers=dense, dense_hidden_size=int(_require(hf, "intermediate_size", origin)))
        if model_type == "qwen3_moe":
            fields.update(qk_norm="per_head", attention_bias=bool(hf.get("attention_bias", False)))
        else:
            shared = int(hf.get("shared_expert_intermediate_size") or 0)
            fields.update(attention_bias=True, shared_expert_hidden_size=shared, shared_expert_gate=shared > 0)
    fields["max_seq_len"] = _max_seq_len(hf, sliding_window)
    try:
        return ModelConfig(**fields)
    except ValueError as error:
        raise CheckpointError(f"{origin}: {error}") from None


def read_hf_config(directory: str | os.PathLike, dtype: str = "bfloat16") -> tuple[ModelConfig, str]:
    """Read `config.json` of a checkpoint directory; return the config and the HF model type."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found; a checkpoint directory needs config.json")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: invalid JSON ({error})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    return config_from_hf(hf, dtype, str(path)), hf["model_type"]


# ---------------------------------------------------------------------------------------------
# Tensor inventory and the expected tensors


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """File, shape and dtype of a stored tensor, read from its safetensors header."""

    file: Path
    shape: tuple[int, ...]
    dtype: str


def _safe_open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="np")
    except Exception as error:  # safetensors raises its own SafetensorError and OSError subclasses
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None


def read_tensor_index(directory: str | os.PathLike) -> dict[str, TensorInfo]:
    """Read the header of every safetensors file of a checkpoint (no tensor data)."""
    directory = Path(directory)
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index_path}: invalid index, expected a JSON object with 'weight_map' ({error})") from None
        files = sorted({directory / name for name in weight_map.values()})
    else:
        weight_map = None
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors file found")

    tensors: dict[str, TensorInfo] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file}: file not found (listed in {index_path.name})")
        with _safe_open(file) as handle:
            for name in handle.keys():
                view = handle.get_slice(name)
                tensors[name] = TensorInfo(file, tuple(int(d) for d in view.get_shape()), view.get_dtype())
    if weight_map is not None:
        for name, file_name in weight_map.items():
            if name not in tensors:
                raise CheckpointError(f"{directory / file_name}: tensor '{name}' listed in {index_path.name} not found")
    return tensors


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One stored tensor and where it goes.

    `target` is the model parameter path. `expert` is the expert slot it fills, or None for the
    whole parameter. `rows` selects a slice of the stored tensor's second axis (fused gate_up
    tensors) before `transpose` applies.
    """

    name: str
    shape: tuple[int, ...]
    target: tuple[Any, ...]
    transpose: bool
    expert: int | None = None
    rows: slice | None = None


def _attention_specs(config: ModelConfig, i: int) -> list[TensorSpec]:
    prefix = f"model.layers.{i}.self_attn"
    hidden, q_size = config.hidden_size, config.num_heads * config.head_dim
    kv_size = config.num_kv_heads * config.head_dim
    target = ("layers", i, "self_attn")
    specs = [
        TensorSpec(f"{prefix}.q_proj.weight", (q_size, hidden), (*target, "q_proj", "kernel"), True),
        TensorSpec(f"{prefix}.k_proj.weight", (kv_size, hidden), (*target, "k_proj", "kernel"), True),
        TensorSpec(f"{prefix}.v_proj.weight", (kv_size, hidden), (*target, "v_proj", "kernel"), True),
        TensorSpec(f"{prefix}.o_proj.weight", (hidden, q_size), (*target, "o_proj", "kernel"), True),
    ]
    if config.attention_bias:
        for name, size in (("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size)):
            specs.append(TensorSpec(f"{prefix}.{name}.bias", (size,), (*target, name, "bias"), False))
    if config.qk_norm != "none":
        q_norm, k_norm = (q_size, kv_size) if config.qk_norm == "full" else (config.head_dim, config.head_dim)
        specs.append(TensorSpec(f"{prefix}.q_norm.weight", (q_norm,), (*target, "q_norm", "weight"), False))
        specs.append(TensorSpec(f"{prefix}.k_norm.weight", (k_norm,), (*target, "k_norm", "weight"), False))
    return specs


def _swiglu_specs(prefix: str, hidden: int, inner: int, target: tuple[Any, ...]) -> list[TensorSpec]:
    return [
        TensorSpec(f"{prefix}.gate_proj.weight", (inner, hidden), (*target, "gate_proj", "kernel"), True),
        TensorSpec(f"{prefix}.up_proj.weight", (inner, hidden), (*target, "up_proj", "kernel"), True),
        TensorSpec(f"{prefix}.down_proj.weight", (hidden, inner), (*target, "down_proj", "kernel"), True),
    ]


def _expert_specs(config: ModelConfig, prefix: str, target: tuple[Any, ...], names: tuple[str, str, str], fused: bool) -> list[TensorSpec]:
    hidden, inner, experts = config.hidden_size, config.expert_hidden_size, config.num_experts
    if fused:
        gate_up = f"{prefix}.experts.gate_up_proj"
        return [
            TensorSpec(gate_up, (experts, 2 * inner, hidden), (*target, "gate_proj"), True, rows=slice(0, inner)),
            TensorSpec(gate_up, (experts, 2 * inner, hidden), (*target, "up_proj"), True, rows=slice(inner, 2 * inner)),
            TensorSpec(f"{prefix}.experts.down_proj", (experts, hidden, inner), (*target, "down_proj"), True),
        ]
    gate, up, down = names
    specs = []
    for e in range(experts):
        base = f"{prefix}.experts.{e}"
        specs.append(TensorSpec(f"{base}.{gate}.weight", (inner, hidden), (*target, "gate_proj"), True, expert=e))
        specs.append(TensorSpec(f"{base}.{up}.weight", (inner, hidden), (*target, "up_proj"), True, expert=e))
        specs.append(TensorSpec(f"{base}.{down}.weight", (hidden, inner), (*target, "down_proj"), True, expert=e))
    return specs


def expected_tensors(config: ModelConfig, model_type: str, available: set[str]) -> list[TensorSpec]:
    """Every tensor a checkpoint of `model_type` with this config must contain, in HF layout."""
    hidden, vocab = config.hidden_size, config.vocab_size
    specs = [
        TensorSpec("model.embed_tokens.weight", (vocab, hidden), ("embed_tokens", "embedding"), False),
        TensorSpec("model.norm.weight", (hidden,), ("norm", "weight"), False),
    ]
    if not config.tie_embeddings:
        specs.append(TensorSpec("lm_head.weight", (vocab, hidden), ("lm_head", "kernel"), True))
    moe_prefix = "block_sparse_moe" if model_type == "mixtral" else "mlp"
    expert_names = ("w1", "w3", "w2") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for i in range(config.num_layers):
        layer = f"model.layers.{i}"
        specs.append(TensorSpec(f"{layer}.input_layernorm.weight", (hidden,), ("layers", i, "input_layernorm", "weight"), False))
        specs.append(TensorSpec(f"{layer}.post_attention_layernorm.weight", (hidden,), ("layers", i, "post_attention_layernorm", "weight"), False))
        specs.extend(_attention_specs(config, i))
        target = ("layers", i, "mlp")
        if i in config.dense_layers:
            specs.extend(_swiglu_specs(f"{layer}.mlp", hidden, config.dense_hidden_size, target))
            continue
        prefix = f"{layer}.{moe_prefix}"
        specs.append(TensorSpec(f"{prefix}.gate.weight", (config.num_experts, hidden), (*target, "router", "kernel"), True))
        fused = f"{prefix}.experts.gate_up_proj" in available
        specs.extend(_expert_specs(config, prefix, target, expert_names, fused))
        if config.shared_expert_hidden_size:
            specs.extend(_swiglu_specs(f"{prefix}.shared_expert", hidden, config.shared_expert_hidden_size, (*target, "shared_expert")))
        if config.shared_expert_gate:
            specs.append(TensorSpec(f"{prefix}.shared_expert_gate.weight", (1, hidden), (*target, "shared_expert_gate", "kernel"), True))
    return specs


def check_tensors(specs: list[TensorSpec], tensors: dict[str, TensorInfo], directory: str | os.PathLike) -> None:
    """Raise `CheckpointError` on the first missing, misshapen, non-float or unexpected tensor."""
    for spec in specs:
        info = tensors.get(spec.name)
        if info is None:
            raise CheckpointError(f"{directory}: tensor '{spec.name}' not found (expected shape {spec.shape})")
        if info.shape != spec.shape:
            raise CheckpointError(
                f"{info.file}: tensor '{spec.name}': expected shape {spec.shape}, found shape {info.shape}; "
                "the checkpoint does not match its config.json"
            )
        if info.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{info.file}: tensor '{spec.name}': expected a float dtype ({sorted(_FLOAT_DTYPES)}), found {info.dtype}")
    expected = {spec.name for spec in specs}
    unexpected = sorted(name for name in tensors if name not in expected and not name.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        first = tensors[unexpected[0]]
        raise CheckpointError(
            f"{first.file}: tensor '{unexpected[0]}' (shape {first.shape}) is not part of the model described by "
            f"config.json ({len(unexpected)} unexpected tensors in all); the checkpoint does not match its config"
        )


# ---------------------------------------------------------------------------------------------
# Loading


def _numpy_dtype(dtype: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)


class _Reader:
    """Open safetensors files on demand and return one tensor at a time as float32 numpy."""

    def __init__(self, tensors: dict[str, TensorInfo]):
        self.tensors = tensors
        self.handles: dict[Path, Any] = {}

    def read(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        if info.file not in self.handles:
            self.handles[info.file] = _safe_open(info.file).__enter__()
        try:
            array = self.handles[info.file].get_tensor(name)
        except Exception as error:  # truncated data surfaces here, after the header was read
            raise CheckpointError(f"{info.file}: tensor '{name}' could not be read ({error})") from None
        return array

    def close(self) -> None:
        for handle in self.handles.values():
            handle.__exit__(None, None, None)
        self.handles.clear()


def _place(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    if spec.rows is not None:
        array = array[:, spec.rows]
    if spec.transpose:
        array = np.swapaxes(array, -1, -2)
    return array


def load_hf_checkpoint(
    directory: str | os.PathLike,
    dtype: str = "bfloat16",
    progress: Callable[[int, int], None] | None = None,
) -> MoeTransformer:
    """Build a `MoeTransformer` from a local Hugging Face checkpoint directory.

    Args:
      directory: contains config.json and the safetensors file(s).
      dtype: "bfloat16" or "float32", the dtype of the model's parameters and activations.
      progress: called as progress(done, total) after each parameter is filled.

    Raises:
      CheckpointError: unsupported config, unreadable file, or a tensor that is missing, unexpected,
        not a float, or of the wrong shape (the message names the tensor and both shapes).
    """
    config, model_type = read_hf_config(directory, dtype)
    tensors = read_tensor_index(directory)
    specs = expected_tensors(config, model_type, set(tensors))
    check_tensors(specs, tensors, directory)

    abstract = nnx.eval_shape(lambda: MoeTransformer(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    variables = dict(nnx.to_flat_state(abstract_state))
    by_target: dict[tuple[Any, ...], list[TensorSpec]] = {}
    for spec in specs:
        by_target.setdefault(spec.target, []).append(spec)
    missing = sorted(str(path) for path in variables if path not in by_target)
    if missing:
        raise CheckpointError(f"{directory}: no tensor maps to model parameters {missing}; this model type is not fully supported")

    target_dtype = _numpy_dtype(dtype)
    reader = _Reader(tensors)
    filled = []
    try:
        for done, (path, variable) in enumerate(variables.items(), start=1):
            parts = by_target[path]
            buffer = np.empty(variable.shape, target_dtype)
            for spec in parts:
                array = _place(spec, reader.read(spec.name)).astype(target_dtype)
                if spec.expert is None:
                    buffer[...] = array
                else:
                    buffer[spec.expert] = array
                del array
            filled.append((path, variable.replace(jnp.asarray(buffer))))
            del buffer
            if progress is not None:
                progress(done, len(variables))
    finally:
        reader.close()
    logger.info("loaded %d tensors into %d parameters from %s", len(specs), len(filled), directory)
    return nnx.merge(graphdef, nnx.from_flat_state(filled))

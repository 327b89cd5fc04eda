"""Compute time of one layer for a forward pass, from the model's shapes and a roofline of the hardware.

Each part of a layer (attention, router, routed experts, shared experts) takes
max(FLOPs / peak_flops, bytes read / memory_bandwidth), and a layer takes the sum of its parts.

Simplifications, each of which makes the estimate a lower bound on a real kernel's time:
- Only weight and KV-cache reads count as memory traffic. Activations, KV-cache writes, norms,
  rotary embeddings, softmax and the token dispatch of the experts are left out.
- The parts of a layer run one after another, each at its own roofline; nothing overlaps and there
  is no kernel launch overhead.
- Each distinct active expert's weights are read once per pass, however many tokens select it.
- Attention reads the whole KV cache of the sequence once per pass (as a fused, flash-style kernel
  does). A token at position i attends to i + 1 positions (causal), so a pass of P tokens after C
  earlier tokens of its sequence computes P x C + P (P + 1) / 2 query-key pairs.
- The context C of a pass is the number of tokens of the same sequence in earlier passes of the trace.
  The trace contains the whole sequence, so no context outside it is assumed.
- The LM head runs for the last token of each pass only (a prefill only needs the next token's logits).

Misses computed on the host (`host_experts_time`) use the same roofline with the host CPU's figures.
"""

from __future__ import annotations

import numpy as np

from specmd_jax.timing.hardware import Hardware
from specmd_jax.timing.models import ModelShape


def roofline_time(flops: np.ndarray | float, num_bytes: np.ndarray | float, hardware: Hardware) -> np.ndarray:
    """Estimate the seconds of `flops` of math that reads `num_bytes` of memory as the larger of the two bounds."""
    compute_bound = np.asarray(flops, np.float64) / hardware.peak_flops
    memory_bound = np.asarray(num_bytes, np.float64) / hardware.memory_bandwidth
    return np.maximum(compute_bound, memory_bound)


def attention_time(model: ModelShape, hardware: Hardware, tokens: np.ndarray, context: np.ndarray) -> np.ndarray:
    """Estimate the seconds of one attention block for passes of `tokens` tokens after `context` earlier tokens.

    Arrays broadcast, and each entry is one pass. FLOPs: the projections (2 per weight per token) plus
    the scores and the value sum (2 x heads x (qk_dim + v_dim) per query-key pair). Bytes: the weights
    plus the KV cache of all context + tokens positions.
    """
    tokens = np.asarray(tokens, np.float64)
    context = np.asarray(context, np.float64)
    weights = model.attention_weight_count
    qk_dim, v_dim = model.score_dims
    query_key_pairs = tokens * context + tokens * (tokens + 1) / 2
    flops = 2 * tokens * weights + 2 * model.num_heads * (qk_dim + v_dim) * query_key_pairs
    num_bytes = (weights + model.kv_values_per_token * (context + tokens)) * model.dtype_bytes
    return roofline_time(flops, num_bytes, hardware)


def router_time(model: ModelShape, hardware: Hardware, tokens: np.ndarray) -> np.ndarray:
    """Estimate the seconds of the router (a hidden x E linear map) for passes of `tokens` tokens."""
    tokens = np.asarray(tokens, np.float64)
    weights = model.hidden * model.num_experts
    return roofline_time(2 * tokens * weights, weights * model.dtype_bytes, hardware)


def routed_experts_time(model: ModelShape, hardware: Hardware, tokens: np.ndarray, active_experts: np.ndarray) -> np.ndarray:
    """Estimate the seconds of the routed experts of one MoE layer.

    FLOPs: 2 x 3 x hidden x expert_ffn per (token, expert) pair, with tokens x top_k pairs. Bytes: the
    weights of each of the `active_experts` distinct experts, read once.
    """
    tokens = np.asarray(tokens, np.float64)
    return routed_pairs_time(model, hardware, tokens * model.top_k, active_experts)


def expert_flops(model: ModelShape, pairs: np.ndarray | float) -> np.ndarray:
    """FLOPs of `pairs` (token, routed expert) pairs: 2 x 3 x hidden x expert_ffn each (three SwiGLU matrices)."""
    return 2 * 3 * model.hidden * model.expert_ffn * np.asarray(pairs, np.float64)


def routed_pairs_time(model: ModelShape, hardware: Hardware, pairs: np.ndarray, active_experts: np.ndarray) -> np.ndarray:
    """Estimate the accelerator seconds of `pairs` (token, expert) pairs over `active_experts` distinct experts, each read once."""
    num_bytes = np.asarray(active_experts, np.float64) * model.expert_bytes
    return roofline_time(expert_flops(model, pairs), num_bytes, hardware)


def host_experts_time(model: ModelShape, hardware: Hardware, pairs: np.ndarray, host_experts: np.ndarray) -> np.ndarray:
    """Estimate the host CPU seconds of `pairs` (token, expert) pairs over `host_experts` distinct experts.

    The same roofline as on the accelerator, with the host figures: max(FLOPs / host_flops, bytes read
    / host_memory_bandwidth), where each expert's weights are read once from host memory. Raises
    ValueError when `hardware` has no host figures.
    """
    if not hardware.has_host_compute:
        raise ValueError(
            f"hardware '{hardware.name}' has no host compute figures: set Hardware.host_flops and "
            "Hardware.host_memory_bandwidth to compute misses on the host"
        )
    compute_bound = expert_flops(model, pairs) / hardware.host_flops
    memory_bound = np.asarray(host_experts, np.float64) * model.expert_bytes / hardware.host_memory_bandwidth
    return np.maximum(compute_bound, memory_bound)


def shared_experts_time(model: ModelShape, hardware: Hardware, tokens: np.ndarray) -> np.ndarray:
    """Estimate the seconds of the always-active shared experts of one MoE layer (0 when the model has none)."""
    tokens = np.asarray(tokens, np.float64)
    if not model.num_shared_experts:
        return np.zeros_like(tokens)
    flops = 2 * 3 * model.hidden * model.shared_expert_ffn * model.num_shared_experts * tokens
    return roofline_time(flops, model.shared_expert_bytes, hardware)


def dense_mlp_time(model: ModelShape, hardware: Hardware, tokens: np.ndarray) -> np.ndarray:
    """Estimate the seconds of the SwiGLU MLP of one dense layer."""
    tokens = np.asarray(tokens, np.float64)
    weights = 3 * model.hidden * model.dense_ffn
    return roofline_time(2 * tokens * weights, weights * model.dtype_bytes, hardware)


def lm_head_time(model: ModelShape, hardware: Hardware, num_passes: int) -> np.ndarray:
    """Estimate the seconds of the output projection for the last token of each of `num_passes` passes."""
    weights = model.hidden * model.vocab_size
    return np.full(num_passes, float(roofline_time(2 * weights, weights * model.dtype_bytes, hardware)))


def moe_layer_times(
    model: ModelShape,
    hardware: Hardware,
    tokens: np.ndarray,
    context: np.ndarray,
    active_experts: np.ndarray,
    pairs: np.ndarray | None = None,
) -> np.ndarray:
    """Estimate the compute seconds of every step, float64 [T, L], from `tokens` and `context` [T] and `active_experts` [T, L].

    `active_experts` counts the distinct routed experts that the accelerator computes at (pass, layer):
    every requested one (`specmd_jax.sim.requests.StepRequests.counts`), or only the resident ones when
    the misses are computed on the host. `pairs` [T, L] counts the (token, expert) pairs it computes;
    None means tokens x top_k, all of them.
    """
    tokens = np.asarray(tokens, np.float64)
    context = np.asarray(context, np.float64)
    active_experts = np.asarray(active_experts, np.float64)
    per_pass = attention_time(model, hardware, tokens, context) + router_time(model, hardware, tokens)
    per_pass = per_pass + shared_experts_time(model, hardware, tokens)
    if pairs is None:
        return per_pass[:, None] + routed_experts_time(model, hardware, tokens[:, None], active_experts)
    return per_pass[:, None] + routed_pairs_time(model, hardware, pairs, active_experts)


def dense_layers_time(model: ModelShape, hardware: Hardware, tokens: np.ndarray, context: np.ndarray) -> np.ndarray:
    """Estimate the compute seconds of all leading dense layers of each pass, float64 [T] (zeros when there are none)."""
    tokens = np.asarray(tokens, np.float64)
    if not model.num_dense_layers:
        return np.zeros_like(tokens)
    one_layer = attention_time(model, hardware, tokens, context) + dense_mlp_time(model, hardware, tokens)
    return model.num_dense_layers * one_layer

"""Flax NNX decoder-only MoE transformer that can record its routing."""

from specmd_jax.model.config import PRESETS, ModelConfig, get_preset
from specmd_jax.model.generate import Generation, greedy_generate, make_step_function
from specmd_jax.model.moe import RoutingDecision, dispatch_experts, route
from specmd_jax.model.transformer import ForwardOutput, KVCache, MoeTransformer, Routing, init_cache

__all__ = [
    "PRESETS", "ForwardOutput", "Generation", "KVCache", "ModelConfig", "MoeTransformer", "Routing",
    "RoutingDecision", "dispatch_experts", "get_preset", "greedy_generate", "init_cache",
    "make_step_function", "route",
]

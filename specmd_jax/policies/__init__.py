"""Eviction policies as pure functions over a state pytree, and their registry."""

from specmd_jax.policies.base import EvictionPolicy, StepInfo
from specmd_jax.policies.registry import get_policy, policy_names, register

__all__ = ["EvictionPolicy", "StepInfo", "get_policy", "policy_names", "register"]

"""The one registry of eviction policies; every other module looks policies up here."""

from __future__ import annotations

from specmd_jax.policies.base import EvictionPolicy
from specmd_jax.policies.classic import BELADY, FIFO, LFU, LRU, RANDOM
from specmd_jax.policies.least_stale import LEAST_STALE
from specmd_jax.policies.s3fifo import S3FIFO
from specmd_jax.policies.sieve import SIEVE

_REGISTRY: dict[str, EvictionPolicy] = {}


def register(policy: EvictionPolicy) -> EvictionPolicy:
    """Add `policy` under its name; a second policy with the same name is an error."""
    if policy.name in _REGISTRY:
        raise ValueError(f"eviction policy '{policy.name}' is already registered")
    _REGISTRY[policy.name] = policy
    return policy


def get_policy(name: str) -> EvictionPolicy:
    """Return the registered policy `name`, or raise `ValueError` listing the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown eviction policy '{name}'; known policies: {', '.join(policy_names())}") from None


def policy_names() -> list[str]:
    return list(_REGISTRY)


for _policy in (LRU, FIFO, LFU, RANDOM, BELADY, LEAST_STALE, SIEVE, S3FIFO):
    register(_policy)

"""Greedy generation with a KV cache: one prefill pass over the prompt, then one pass per token."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from specmd_jax.model.transformer import MoeTransformer, Routing, init_cache


class Generation(NamedTuple):
    """Output of `greedy_generate`.

    Attributes:
      tokens: int32 [B, M] the generated tokens.
      passes: the `Routing` of each forward pass as numpy arrays, in execution order: the prefill
        (S = prompt length) and then M - 1 decode passes (S = 1), or None unless recorded.
    """

    tokens: np.ndarray
    passes: list[Routing] | None


def make_step_function(model: MoeTransformer, record: bool, record_hidden: bool = False) -> Callable:
    """Return a jitted step(state, tokens, cache) -> ForwardOutput over the model's split state.

    Each distinct token shape compiles once: the prefill once per prompt length, decoding once.
    """
    graphdef, _ = nnx.split(model)

    @jax.jit
    def step(state, tokens, cache):
        return nnx.merge(graphdef, state).forward(tokens, cache=cache, record=record, record_hidden=record_hidden)

    return step


def greedy_generate(
    model: MoeTransformer,
    prompt: np.ndarray,
    num_new_tokens: int,
    *,
    record: bool = False,
    record_hidden: bool = False,
    progress: bool = False,
    step: Callable | None = None,
) -> Generation:
    """Generate `num_new_tokens` tokens after `prompt` [B, P] by argmax decoding.

    Argmax ties go to the lower token id. `step` may be a function from `make_step_function` to
    reuse its compiled code across calls with the same flags.
    """
    prompt = np.asarray(prompt, dtype=np.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt: expected token ids of shape [batch, length >= 1], got shape {prompt.shape}")
    if num_new_tokens < 1:
        raise ValueError(f"num_new_tokens: expected a positive integer, got {num_new_tokens}")
    total = prompt.shape[1] + num_new_tokens - 1
    if total > model.config.max_seq_len:
        raise ValueError(
            f"prompt of {prompt.shape[1]} tokens + {num_new_tokens} new tokens needs {total} cache positions, "
            f"more than max_seq_len={model.config.max_seq_len}; shorten the prompt or generate fewer tokens"
        )
    step = step or make_step_function(model, record, record_hidden)
    _, state = nnx.split(model)
    cache = init_cache(model.config, prompt.shape[0], total)

    passes: list[Routing] = []
    generated = []
    tokens = jnp.asarray(prompt)
    for _ in tqdm(range(num_new_tokens), desc="generate", unit="token", disable=not progress):
        out = step(state, tokens, cache)
        cache = out.cache
        next_token = jnp.argmax(out.logits[:, -1, :], axis=-1).astype(jnp.int32)
        generated.append(next_token)
        if record:
            passes.append(jax.tree.map(np.asarray, out.routing))
        tokens = next_token[:, None]
    return Generation(np.stack([np.asarray(t) for t in generated], axis=1), passes if record else None)

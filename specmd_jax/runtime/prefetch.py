"""Prefetchers for the cache manager: the simulator's prefetch phase fed by a candidate source.

`EnginePrefetcher` runs `specmd_jax.sim.engine.prefetch_step`, the simulator's own prefetch phase, with
the same inputs as the simulator's prefetch scan (`specmd_jax.sim.prefetch`): candidates in priority
order, already resident candidates protected from eviction, the same budget and random key. A
candidate source proposes the items of coming steps:
- `GateCandidates`, live: MoE layer l + 1's router applied to layer l's router input (the model's
  speculative logits), scored and selected like the simulator's `gate-speculative` prefetcher.
- `TableCandidates`, replay: a score table of a registry prefetcher
  (`specmd_jax.prefetch.registry.build_score_table`) and its selection rule, selected per step by the
  simulator's own `select_candidates`, so every registry prefetcher makes the simulator's choices.
- `OracleCandidates`, replay only: the true requests of the next `lookahead` steps of a recorded trace,
  like the simulator's `oracle` prefetcher, without a score table.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from specmd_jax.policies.base import NEVER, EvictionPolicy
from specmd_jax.runtime.manager import PrefetchContext, PrefetchDecision
from specmd_jax.sim.engine import init_tracking, prefetch_step
from specmd_jax.sim.prefetch import SELECTIONS, PrefetchParams, select_candidates
from specmd_jax.sim.requests import StepRequests

CandidateSource = Callable[[PrefetchContext], tuple[np.ndarray, np.ndarray]]
"""Returns (flat ids in priority order, the step each is meant for); both int32 and of equal length.
Resident items may be proposed: they are kept (protected from eviction) rather than loaded, and their
step is not read."""


@functools.partial(jax.jit, static_argnames=("policy", "num_steps"))
def _prefetch_phase(
    policy, params, state, tracking, candidates, targets, next_use, protected, step, pass_index, capacity, budget, base_key, num_steps
):
    # The simulator's prefetch scan draws the prefetch phase's random values from fold_in(step key, 1).
    rng = jax.random.fold_in(jax.random.fold_in(base_key, step), 1)
    return prefetch_step(
        policy, params, state, tracking, candidates, targets, next_use, protected, step, pass_index, capacity, budget, rng, num_steps
    )


@jax.jit
def _clear_tracking(tracking, done):
    # A requested prefetch has been used and an evicted one wasted: neither is pending any more.
    return type(tracking)(jnp.where(done, -1, tracking.target), jnp.where(done, -1, tracking.issued))


class EnginePrefetcher:
    """The simulator's prefetch phase (`prefetch_step`) as a manager prefetcher.

    Args:
      policy, params: the manager's eviction policy and its hyper-parameters.
      source: proposes candidates (see `CandidateSource`).
      num_layers, num_experts: L and E.
      num_steps: steps of the run.
      max_candidates: static length of the candidate list; longer proposals are cut.
      budget: the maximum prefetches per step; None means `max_candidates`.
      next_use: int32 [T * L * E] from `specmd_jax.sim.prefetch.next_request_table` for a replayed
        trace (Belady reads it), or None for a live run, where every candidate's next use is NEVER.
      seed: seed of the per-step random keys, as for the manager.
      decision_device: where the policy runs (the first CPU device by default).
    """

    def __init__(
        self,
        policy: EvictionPolicy,
        params: Any,
        source: CandidateSource,
        *,
        num_layers: int,
        num_experts: int,
        num_steps: int,
        max_candidates: int,
        budget: int | None = None,
        next_use: np.ndarray | None = None,
        seed: int = 0,
        decision_device: jax.Device | None = None,
    ):
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0):
            raise ValueError(f"prefetch budget: expected an integer >= 0 or None (no limit), got {budget!r}")
        self.policy, self.params, self.source = policy, params, source
        self.num_experts, self.num_items, self.num_steps = num_experts, num_layers * num_experts, num_steps
        if next_use is not None and np.shape(next_use) != (num_steps * num_experts,):
            raise ValueError(f"next_use: expected shape ({num_steps * num_experts},) (steps x experts), got {np.shape(next_use)}")
        self.max_candidates = int(max_candidates)
        self.budget = self.max_candidates if budget is None else int(budget)
        self.next_use = next_use
        device = decision_device or jax.devices("cpu")[0]
        self.tracking = jax.device_put(init_tracking(self.num_items), device)
        self.base_key = jax.device_put(jax.random.PRNGKey(seed), device)

    def __call__(self, context: PrefetchContext) -> PrefetchDecision:
        requested = np.zeros(self.num_items, bool)
        requested[context.requested] = True
        done = requested.copy()
        done[context.demand_victims] = True
        self.tracking = _clear_tracking(self.tracking, done)

        proposed, targets = self.source(context)
        proposed = np.asarray(proposed, np.int32).reshape(-1)
        targets = np.asarray(targets, np.int32).reshape(-1)
        resident = np.asarray(jax.device_get(context.pool.resident))
        already_resident = resident[proposed]
        protected = requested.copy()
        protected[proposed[already_resident]] = True
        # Like the simulator's candidate selection: the first `budget` non-resident candidates.
        limit = min(self.max_candidates, self.budget)
        proposed, targets = proposed[~already_resident][:limit], targets[~already_resident][:limit]

        candidates = np.full(self.max_candidates, -1, np.int32)
        candidate_targets = np.full(self.max_candidates, -1, np.int32)
        next_use = np.full(self.max_candidates, NEVER, np.int32)
        candidates[:proposed.size] = proposed
        candidate_targets[:targets.size] = targets
        if self.next_use is not None and proposed.size:
            lookup = targets.astype(np.int64) * self.num_experts + proposed % self.num_experts
            next_use[:proposed.size] = self.next_use[lookup]
        pool, self.tracking, outcome = _prefetch_phase(
            self.policy, self.params, context.pool, self.tracking, candidates, candidate_targets, next_use, protected,
            np.int32(context.step), np.int32(context.pass_index), np.int32(context.capacity), np.int32(self.budget),
            self.base_key, num_steps=self.num_steps,
        )
        admitted, victims = jax.device_get((outcome.admitted, outcome.victims))
        return PrefetchDecision(pool, admitted[admitted >= 0].astype(np.int32), np.flatnonzero(victims).astype(np.int32))


def gate_scores(speculative_logits: np.ndarray) -> np.ndarray:
    """float32 [E]: the mean over tokens of the softmax of their speculative logits [N, E].

    The arithmetic follows `specmd_jax.prefetch.sources.gate_speculative_scores` (float64 softmax,
    tokens summed in order, float32 result), so the ranking ties break the same way as in a simulation.
    """
    logits = np.asarray(speculative_logits).astype(np.float64)
    probabilities = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probabilities /= probabilities.sum(axis=-1, keepdims=True)
    summed = np.add.reduceat(probabilities, [0], axis=0)[0]
    return (summed / logits.shape[0]).astype(np.float32)


class GateCandidates:
    """Propose the `top_k` experts of the next MoE layer with the highest gate score (see `gate_scores`).

    Ranking is by score, highest first, then by expert id, as in the simulator's `top-k` selection. The
    last MoE layer of a pass proposes nothing, because the next pass's tokens are not known yet.
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int):
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= num_experts:
            raise ValueError(f"gate prefetch top_k: expected an integer in [1, {num_experts}], got {top_k!r}")
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, int(top_k)

    def __call__(self, context: PrefetchContext) -> tuple[np.ndarray, np.ndarray]:
        if context.layer + 1 >= self.num_layers or context.speculative_logits is None:
            empty = np.zeros(0, np.int32)
            return empty, empty
        scores = gate_scores(context.speculative_logits)
        order = np.argsort(-scores, kind="stable")
        chosen = order[:self.top_k]
        chosen = chosen[scores[chosen] > 0]
        flat = (chosen + (context.layer + 1) * self.num_experts).astype(np.int32)
        return flat, np.full(flat.size, context.step + 1, np.int32)


class OracleCandidates:
    """Propose the true requests of steps s + 1 .. s + lookahead of a recorded trace: nearest step first, then ascending id."""

    def __init__(self, requests: StepRequests, num_experts: int, lookahead: int = 1):
        if isinstance(lookahead, bool) or not isinstance(lookahead, (int, np.integer)) or not 1 <= lookahead <= requests.num_layers:
            raise ValueError(f"prefetch lookahead: expected an integer in [1, {requests.num_layers}] (the MoE layers), got {lookahead!r}")
        self.requests = requests
        self.num_experts = num_experts
        self.lookahead = int(lookahead)

    def __call__(self, context: PrefetchContext) -> tuple[np.ndarray, np.ndarray]:
        num_layers = self.requests.num_layers
        num_steps = self.requests.num_passes * num_layers
        flat, targets = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for target in range(context.step + 1, min(context.step + 1 + self.lookahead, num_steps)):
            pass_index, layer = divmod(target, num_layers)
            experts = self.requests.experts[pass_index, layer]
            experts = experts[experts >= 0]
            flat.append(experts + layer * self.num_experts)
            targets.append(np.full(experts.size, target))
        return np.concatenate(flat).astype(np.int32), np.concatenate(targets).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("selection", "num_layers", "max_budget"))
def _select_step(table, resident, step, params, *, selection, num_layers, max_budget):
    return select_candidates(
        table[step], resident, step, params,
        selection=selection, num_layers=num_layers, num_steps=table.shape[0], max_budget=max_budget,
    )


class TableCandidates:
    """Select candidates from a score table with the simulator's `select_candidates`, step by step.

    Proposes the selected experts that are already resident first (ascending flat id, to be protected)
    and then the non-resident candidates in the simulator's priority order: lookahead, then score, then
    expert id, at most `budget` of them. Pair it with an `EnginePrefetcher` whose `max_candidates` is
    `self.max_candidates` and whose budget is `budget`, as the simulator's prefetch scan does.

    Args:
      scores: float32 [T, L, D, E] or [T * L, D, E], the table of a registry prefetcher, e.g. from
        `specmd_jax.prefetch.registry.build_score_table`. Row s scores the experts of steps s + 1 .. s + D.
      selection: one of `specmd_jax.sim.prefetch.SELECTIONS` (all, top-k, mass).
      top_k, threshold, budget: the resolved parameters (`specmd_jax.prefetch.registry.resolved_params`).
      num_layers: L, the MoE layers.
      decision_device: where the selection runs (the first CPU device by default).
    """

    def __init__(
        self,
        scores: np.ndarray,
        selection: str,
        *,
        top_k: int,
        threshold: float,
        budget: int,
        num_layers: int,
        decision_device: jax.Device | None = None,
    ):
        scores = np.asarray(scores)
        if scores.ndim == 4:
            if scores.shape[1] != num_layers:
                raise ValueError(f"score table: expected {num_layers} layers on axis 1 of [T, L, D, E], got shape {scores.shape}")
            scores = scores.reshape(-1, *scores.shape[2:])
        if scores.ndim != 3 or min(scores.shape) < 1 or scores.shape[0] % num_layers:
            raise ValueError(
                f"score table: expected shape [T, L, D, E] or [T * L, D, E] with L = {num_layers} and no empty axis, "
                f"got {scores.shape}"
            )
        if not np.issubdtype(scores.dtype, np.floating):
            raise ValueError(f"score table: expected float32 scores, got dtype {scores.dtype}")
        bad = ~np.isfinite(scores) | (scores < 0)
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"score table: expected finite scores >= 0, got {scores[index]} at index {index} of [T * L, D, E]")
        if selection not in SELECTIONS:
            raise ValueError(f"invalid selection {selection!r}: expected one of {SELECTIONS}")
        _check_integer("top_k", top_k, 1)
        _check_integer("budget", budget, 0)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) or not 0 < threshold <= 1:
            raise ValueError(f"prefetch threshold: expected a number in (0, 1], got {threshold!r}")

        device = decision_device or jax.devices("cpu")[0]
        self.table = jax.device_put(scores.astype(np.float32), device)
        self.selection, self.num_layers = selection, int(num_layers)
        self.num_steps = scores.shape[0]
        self.budget = int(budget)
        # The simulator sizes its candidate list as the largest budget of a group, at least 1.
        self.max_candidates = max(1, self.budget)
        self.params = jax.device_put(
            PrefetchParams(top_k=np.int32(top_k), threshold=np.float32(threshold), budget=np.int32(budget)), device
        )

    def __call__(self, context: PrefetchContext) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= context.step < self.num_steps:
            raise ValueError(f"step {context.step} is outside the score table's {self.num_steps} steps")
        candidates, targets, keep_resident = jax.device_get(_select_step(
            self.table, context.pool.resident, np.int32(context.step), self.params,
            selection=self.selection, num_layers=self.num_layers, max_budget=self.max_candidates,
        ))
        protected = np.flatnonzero(keep_resident).astype(np.int32)
        chosen = candidates >= 0
        flat = np.concatenate([protected, candidates[chosen]]).astype(np.int32)
        return flat, np.concatenate([np.full(protected.size, -1, np.int32), targets[chosen]]).astype(np.int32)


def _check_integer(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"prefetch {name}: expected an integer >= {low}, got {value!r}")

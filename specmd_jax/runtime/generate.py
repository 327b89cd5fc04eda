"""Greedy generation with offloaded experts: the forward pass runs layer by layer from Python so the
cache manager can act between the router and the experts of every MoE layer.

A run is one or more prefill passes over the prompt (chunks of `prefill_chunk` tokens, all of it by
default) and then one decode pass per further token, like `specmd_jax.model.generate.greedy_generate`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from specmd_jax.prefetch import registry
from specmd_jax.prefetch.registry import DEFAULT_THRESHOLD, DEFAULT_TRAIN_FRACTION, PrefetchConfig, build_score_table, resolved_params
from specmd_jax.runtime.execution import OffloadedModel
from specmd_jax.runtime.link import Link, Transfer
from specmd_jax.runtime.manager import ExpertCacheManager, Prefetcher, StepRecord
from specmd_jax.runtime.prefetch import EnginePrefetcher, GateCandidates, TableCandidates
from specmd_jax.sim.prefetch import next_request_table
from specmd_jax.sim.requests import build_requests, request_presence
from specmd_jax.timing.estimate import sequence_ttft
from specmd_jax.traces.trace import PASS_DECODE, PASS_PREFILL, Trace, TraceMetadata, make_trace

logger = logging.getLogger(__name__)

REPLAY_PREFETCHERS = tuple(registry.PREFETCHERS)
"""The simulator's prefetchers (`specmd_jax.prefetch.registry.PREFETCHERS`). Their score tables are built
from a recorded trace, so they run only when one is replayed."""

PREFETCHERS = ("none", "gate") + REPLAY_PREFETCHERS
"""Prefetchers by name: none; gate (the next layer's router on this layer's input, live); and the
`REPLAY_PREFETCHERS`."""


@dataclasses.dataclass(frozen=True, eq=False)
class OffloadedRun:
    """Tokens, routing, decisions and timing of one offloaded generation.

    Attributes:
      tokens: int32 [B, M], the generated tokens.
      logits: float32 [B, M, V], the logits each token was chosen from.
      trace: the routing of every pass, as a trace with one sequence (tokens batch-major in a pass).
      records: one `StepRecord` per step, in step order.
      transfers: every transfer in issue order.
      pass_time: float64 [T], wall seconds of each pass, from its embedding to its next token on the host.
      policy, capacity, expert_bytes, link_bandwidth: the settings (bandwidth None without emulation).
    """

    tokens: np.ndarray
    logits: np.ndarray
    trace: Trace
    records: list[StepRecord]
    transfers: list[Transfer]
    pass_time: np.ndarray
    policy: str
    capacity: int
    expert_bytes: int
    link_bandwidth: float | None

    @property
    def requests(self) -> int:
        return int(sum(record.requests.size for record in self.records))

    @property
    def hits(self) -> int:
        return int(sum(record.hits for record in self.records))

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else float("nan")

    @property
    def bytes_moved(self) -> int:
        return int(sum(transfer.num_bytes for transfer in self.transfers))

    @property
    def total_stall(self) -> float:
        return float(sum(record.stall for record in self.records))

    @property
    def transfer_time(self) -> np.ndarray:
        """float64 [T], host seconds each pass spent on transfers: issuing, waiting and writing slots."""
        per_pass = np.zeros(self.trace.num_passes)
        for record in self.records:
            per_pass[record.pass_index] += record.stall + record.transfer_overhead
        return per_pass

    @property
    def ttft(self) -> float | None:
        """Seconds of the prefill passes plus the first decode pass (the timing model's definition), or None."""
        return first_token_time(self.pass_time, self.trace)

    @property
    def tpot(self) -> float | None:
        """Mean seconds of a decode pass, or None without decode passes."""
        return mean_decode_time(self.pass_time, self.trace)

    def outcomes(self, max_requests: int | None = None) -> np.ndarray:
        """int8 [T, L, R], the outcome of each request slot, laid out like the simulator's recorded events."""
        num_layers = self.trace.num_layers
        width = max_requests or max(1, max(record.requests.size for record in self.records))
        result = np.zeros((self.trace.num_passes, num_layers, width), np.int8)
        for record in self.records:
            result[record.pass_index, record.layer, :record.outcomes.size] = record.outcomes
        return result


def median_run(runs: list[OffloadedRun]) -> OffloadedRun:
    """Combine repeats of one run: the first run with each pass time and each step's stall and host
    transfer time replaced by the median over the repeats.

    Raises ValueError unless every repeat made the same decisions and generated the same tokens.
    """
    if not runs:
        raise ValueError("median_run: expected at least one run, got none")
    first = runs[0]
    for index, run in enumerate(runs[1:], start=1):
        same = np.array_equal(run.tokens, first.tokens) and len(run.records) == len(first.records) and all(
            np.array_equal(a.outcomes, b.outcomes) and np.array_equal(a.victims, b.victims) and np.array_equal(a.prefetched, b.prefetched)
            for a, b in zip(run.records, first.records)
        )
        if not same:
            raise ValueError(f"median_run: run {index} made other decisions than run 0, so their times cannot be combined")
    stalls = np.median([[record.stall for record in run.records] for run in runs], axis=0)
    overheads = np.median([[record.transfer_overhead for record in run.records] for run in runs], axis=0)
    records = [
        dataclasses.replace(record, stall=float(stall), transfer_overhead=float(overhead))
        for record, stall, overhead in zip(first.records, stalls, overheads)
    ]
    pass_time = np.median([run.pass_time for run in runs], axis=0)
    return dataclasses.replace(first, records=records, pass_time=pass_time)


def first_token_time(pass_time: np.ndarray, trace: Trace) -> float | None:
    """TTFT as the timing model defines it: the prefill passes plus the first decode pass; None without both."""
    return sequence_ttft(pass_time, trace.pass_kind, trace.pass_sequence).get(int(trace.pass_sequence[0]))


def mean_decode_time(pass_time: np.ndarray, trace: Trace) -> float | None:
    """Mean time of a decode pass, or None without decode passes."""
    decode = trace.pass_kind == PASS_DECODE
    return float(np.mean(pass_time[decode])) if decode.any() else None


def pass_lengths(prompt_length: int, num_new_tokens: int, prefill_chunk: int | None) -> list[int]:
    """Tokens of each pass: the prompt in chunks of `prefill_chunk` (default: one pass), then M - 1 decode passes."""
    chunk = prompt_length if prefill_chunk is None else prefill_chunk
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"prefill_chunk: expected a positive integer or None, got {prefill_chunk!r}")
    prefill = [min(chunk, prompt_length - start) for start in range(0, prompt_length, chunk)]
    return prefill + [1] * (num_new_tokens - 1)


def _check_replay(trace: Trace, config, lengths: list[int], batch: int) -> None:
    meta = trace.metadata
    if (meta.num_layers, meta.num_experts, meta.top_k) != (config.num_moe_layers, config.num_experts, config.top_k):
        raise ValueError(
            f"replay trace has {meta.num_layers} MoE layers, {meta.num_experts} experts, top-{meta.top_k}; the model has "
            f"{config.num_moe_layers}, {config.num_experts}, top-{config.top_k}"
        )
    recorded = np.diff(trace.pass_offsets).tolist()
    expected = [batch * length for length in lengths]
    if recorded != expected:
        raise ValueError(
            f"replay trace passes have {recorded[:8]}{'...' if len(recorded) > 8 else ''} tokens ({len(recorded)} passes), "
            f"but this run has {expected[:8]}{'...' if len(expected) > 8 else ''} ({len(expected)} passes); "
            "use the prompt, token count and prefill chunk the trace was recorded with"
        )


def offloaded_generate(
    model: OffloadedModel,
    prompt: np.ndarray,
    num_new_tokens: int,
    *,
    policy: str = "least-stale",
    capacity: int,
    link: Link | None = None,
    seed: int = 0,
    params=None,
    prefetch: str = "none",
    prefetch_budget: int | None = None,
    prefetch_lookahead: int = 1,
    prefetch_top_k: int | None = None,
    prefetch_threshold: float = DEFAULT_THRESHOLD,
    train_fraction: float = DEFAULT_TRAIN_FRACTION,
    score_tables: Mapping[str, np.ndarray] | None = None,
    prefetcher: Prefetcher | None = None,
    prefill_chunk: int | None = None,
    replay: Trace | None = None,
    record_speculative: bool = False,
    model_name: str = "",
) -> OffloadedRun:
    """Generate `num_new_tokens` tokens after `prompt` [B, P] by argmax decoding, with offloaded experts.

    Args:
      capacity: cache slots for all L x E experts (one `global` pool).
      link: the link to the cache's device (default: `model.device`, no emulation).
      prefetch: one of `PREFETCHERS`. A name of `REPLAY_PREFETCHERS` needs `replay` and makes the
        decisions of `run_sweep` with `PrefetchConfig(prefetch, prefetch_lookahead, prefetch_top_k,
        prefetch_threshold, prefetch_budget)` on the replayed trace.
      prefetch_budget: the maximum prefetches per step; None means no limit.
      prefetch_lookahead: steps ahead a replay prefetcher scores, in [1, L]; gate needs 1.
      prefetch_top_k: experts per target step for the top-k selections (gate included); None means
        the model's top-k.
      prefetch_threshold: score share per target step for the mass selection (`score`), in (0, 1].
      train_fraction: share of the replayed passes on which the trained prefetchers (top-k, score,
        co-occurrence) estimate their tables.
      score_tables: float32 [T, L, D, E] tables by prefetcher name, as for `run_sweep`; required for
        `learned` (e.g. from `specmd_jax.predictor.predict.predict_scores`).
      prefetcher: a custom prefetch phase; it replaces `prefetch`.
      replay: a trace recorded from the same model, prompt and pass layout. Its next-request steps are
        given to the policy (Belady needs them), and a run whose routing leaves it raises ValueError.
      record_speculative: store the speculative logits in the trace. They are the next MoE layer's
        router applied to each MoE layer's input, and the gate prefetcher computes them anyway.
    """
    config = model.config
    prompt = np.asarray(prompt, np.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt: expected token ids of shape [batch, length >= 1], got shape {prompt.shape}")
    if isinstance(num_new_tokens, bool) or not isinstance(num_new_tokens, (int, np.integer)) or num_new_tokens < 1:
        raise ValueError(f"num_new_tokens: expected a positive integer, got {num_new_tokens!r}")
    _check_prefetch_args(
        prefetch, prefetch_budget, prefetch_lookahead, prefetch_top_k, prefetch_threshold, replay, config.num_moe_layers
    )
    batch, prompt_length = prompt.shape
    total = prompt_length + num_new_tokens - 1
    if total > config.max_seq_len:
        raise ValueError(f"prompt of {prompt_length} tokens + {num_new_tokens} new tokens needs {total} positions, more than max_seq_len={config.max_seq_len}")
    lengths = pass_lengths(prompt_length, num_new_tokens, prefill_chunk)
    num_prefill = len(lengths) - (num_new_tokens - 1)
    num_layers = config.num_moe_layers
    num_steps = len(lengths) * num_layers

    requests = None
    if replay is not None:
        _check_replay(replay, config, lengths, batch)
        requests = build_requests(replay)
    link = link or Link(model.device)
    manager = ExpertCacheManager(
        model.host, policy=policy, capacity=capacity, link=link, num_steps=num_steps,
        knows_next_use=replay is not None, seed=seed, params=params,
    )
    want_speculative = record_speculative or (prefetcher is None and prefetch == "gate")
    if prefetcher is None and prefetch == "gate":
        prefetcher = _gate_prefetcher(manager, config, prefetch_budget, prefetch_top_k, seed)
    elif prefetcher is None and prefetch != "none":
        prefetch_config = PrefetchConfig(
            prefetch, lookahead=prefetch_lookahead, top_k=prefetch_top_k, threshold=prefetch_threshold, budget=prefetch_budget,
        )
        prefetcher = _table_prefetcher(manager, prefetch_config, replay, train_fraction, score_tables, seed)
    manager.prefetcher = prefetcher

    kv_cache = list(model.init_cache(batch, total).layers)
    position = 0
    feed = [prompt[:, start:start + n] for start, n in zip(np.cumsum([0] + lengths[:num_prefill - 1]), lengths[:num_prefill])]
    tokens, logits, expert_ids, speculative, times = [], [], [], [], []
    for pass_index, length in enumerate(lengths):
        began = time.perf_counter()
        pass_tokens = feed[pass_index] if pass_index < num_prefill else tokens[-1][:, None]
        start = jnp.asarray(position, jnp.int32)
        x = model.embed(pass_tokens)
        routed, guesses = [], []
        for layer in range(config.num_layers):
            if not model.is_moe(layer):
                x, kv_cache[layer] = model.dense_layer(layer, x, start, kv_cache[layer])
                continue
            moe_index = len(routed)
            routing = model.attend_and_route(layer, x, start, kv_cache[layer])
            kv_cache[layer] = routing.cache
            selected = np.asarray(routing.expert_ids)
            routed.append(selected)
            next_steps = None
            if requests is not None:
                next_steps = _replay_next_steps(requests, pass_index, moe_index, selected)
            guess = None
            if want_speculative and moe_index + 1 < num_layers:
                guess = np.asarray(model.speculate(config.moe_layers[moe_index + 1], routing.mlp_input))
            guesses.append(guess)
            table = manager.handle_step(
                pass_index, moe_index, selected, next_steps=next_steps, hidden=routing.mlp_input, speculative_logits=guess
            )
            x = model.routed_experts(layer, routing, table, manager.cache.slots)
        last = np.asarray(model.last_logits(x))
        if pass_index >= num_prefill - 1:
            logits.append(last)
            tokens.append(np.argmax(last, axis=-1).astype(np.int32))
        position += length
        times.append(time.perf_counter() - began)
        expert_ids.append(np.stack(routed, axis=1))  # [B * S, L, K]
        if want_speculative:
            missing = np.full((batch * length, config.num_experts), np.nan, np.float32)
            speculative.append(np.stack([missing if g is None else g for g in guesses], axis=1))  # [B * S, L, E]
    manager.finish()

    pass_kind = np.array([PASS_PREFILL] * num_prefill + [PASS_DECODE] * (len(lengths) - num_prefill), np.int8)
    metadata = TraceMetadata(
        model=model_name or config.name, num_layers=num_layers, num_experts=config.num_experts, top_k=config.top_k,
        source="specmd_jax.runtime.offloaded_generate", layer_ids=tuple(config.moe_layers),
        notes=f"policy {manager.policy.name}, capacity {capacity}, prefetch {prefetch}",
    )
    trace = make_trace(
        np.concatenate(expert_ids), metadata,
        pass_offsets=np.concatenate([[0], np.cumsum([batch * n for n in lengths])]),
        pass_kind=pass_kind, pass_sequence=np.zeros(len(lengths), np.int32),
        speculative_logits=np.concatenate(speculative) if want_speculative else None, origin="offloaded run",
    )
    return OffloadedRun(
        tokens=np.stack(tokens, axis=1), logits=np.stack(logits, axis=1), trace=trace, records=manager.records,
        transfers=list(link.log), pass_time=np.asarray(times), policy=manager.policy.name, capacity=capacity,
        expert_bytes=model.host.expert_bytes, link_bandwidth=link.bandwidth,
    )


def _replay_next_steps(requests, pass_index: int, layer: int, selected: np.ndarray) -> np.ndarray:
    """Return the recorded next-request steps of this step's requests, after checking the routing matches."""
    if pass_index >= requests.num_passes:
        raise ValueError(f"the run has more passes than the replay trace ({requests.num_passes})")
    recorded = requests.experts[pass_index, layer]
    count = int(requests.counts[pass_index, layer])
    live = np.unique(selected)
    if not np.array_equal(live, recorded[:count]):
        raise ValueError(
            f"routing left the replay trace at pass {pass_index}, MoE layer {layer}: the model selected experts "
            f"{live.tolist()}, the trace has {recorded[:count].tolist()}; replay a trace recorded from this model and prompt"
        )
    return requests.next_step[pass_index, layer, :count]


def _check_prefetch_args(prefetch, budget, lookahead, top_k, threshold, replay, num_layers: int) -> None:
    if prefetch not in PREFETCHERS:
        raise ValueError(f"invalid prefetch {prefetch!r}: expected one of {PREFETCHERS}")
    if prefetch in REPLAY_PREFETCHERS and replay is None:
        raise ValueError(
            f"prefetch {prefetch!r} builds its score table from a recorded trace: pass replay=trace, a run recorded with "
            "the same model, prompt and passes"
        )
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0):
        raise ValueError(f"prefetch_budget: expected an integer >= 0 or None (the default limit), got {budget!r}")
    if isinstance(lookahead, bool) or not isinstance(lookahead, (int, np.integer)) or not 1 <= lookahead <= num_layers:
        raise ValueError(f"prefetch_lookahead: expected an integer in [1, {num_layers}] (the MoE layers), got {lookahead!r}")
    if prefetch == "gate" and lookahead != 1:
        raise ValueError(f"prefetch_lookahead: gate proposes experts of the next MoE layer only, so it needs 1, got {lookahead}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"prefetch_top_k: expected an integer >= 1 or None (the model's top-k), got {top_k!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError(f"prefetch_threshold: expected a number in (0, 1], got {threshold!r}")


def _gate_prefetcher(manager, config, budget, top_k, seed) -> EnginePrefetcher:
    source = GateCandidates(config.num_moe_layers, config.num_experts, config.top_k if top_k is None else top_k)
    return EnginePrefetcher(
        manager.policy, manager.params, source, num_layers=config.num_moe_layers, num_experts=config.num_experts,
        num_steps=manager.num_steps, max_candidates=config.num_experts, budget=budget, seed=seed,
        decision_device=manager.decision_device,
    )


def _table_prefetcher(manager, prefetch: PrefetchConfig, replay, train_fraction, score_tables, seed) -> EnginePrefetcher:
    """Build a registry prefetcher with the simulator's score table, selection and resolved parameters."""
    presence = request_presence(replay)
    table = build_score_table(
        replay, presence, prefetch.prefetcher, prefetch.lookahead, train_fraction=train_fraction, score_tables=score_tables,
    )
    num_layers, num_experts = replay.num_layers, replay.num_experts
    top_k, threshold, budget = resolved_params(prefetch, replay.metadata.top_k, num_experts)
    source = TableCandidates(
        table, prefetch.prefetcher.selection, top_k=top_k, threshold=threshold, budget=budget, num_layers=num_layers,
        decision_device=manager.decision_device,
    )
    logger.info("prefetcher %s on the replayed trace: top_k %d, threshold %g, budget %d", prefetch.label, top_k, threshold, budget)
    return EnginePrefetcher(
        manager.policy, manager.params, source, num_layers=num_layers, num_experts=num_experts,
        num_steps=manager.num_steps, max_candidates=source.max_candidates, budget=budget,
        next_use=next_request_table(presence), seed=seed, decision_device=manager.decision_device,
    )

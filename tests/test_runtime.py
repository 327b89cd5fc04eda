"""Tests of offloaded generation: tokens and logits against the resident model, and every decision
against the simulator (`run_sweep` on the trace the run recorded)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from specmd_jax.model import ModelConfig, MoeTransformer, init_cache
from specmd_jax.policies.registry import policy_names
from specmd_jax.prefetch.registry import PrefetchConfig
from specmd_jax.runtime import (
    EnginePrefetcher, HostExperts, Link, OffloadedModel, OracleCandidates, PrefetchDecision, offloaded_generate,
)
from specmd_jax.runtime.manager import resolve_policy
from specmd_jax.sim.engine import OUTCOME_HIT
from specmd_jax.sim.requests import build_requests
from specmd_jax.sim.sweep import CapacityError, SimConfig, run_sweep

CONFIG = ModelConfig(
    name="runtime-test", vocab_size=40, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
    num_experts=8, top_k=2, expert_hidden_size=16, qk_norm="full", dense_layers=(1,), dense_hidden_size=24,
    shared_expert_hidden_size=8, shared_expert_gate=True, max_seq_len=32,
)
PROMPT = np.array([[3, 1, 4, 1, 5, 9]], np.int32)
NEW_TOKENS = 6
# 3 MoE layers x 8 experts = 24 items. The prefill requests at most 8 experts of a layer and a decode
# pass 2, so 9 slots are feasible and force evictions in every pass.
CAPACITY = 9
LIVE_POLICIES = [name for name in policy_names() if name != "belady"]


@pytest.fixture(scope="module")
def model():
    return MoeTransformer(CONFIG, rngs=nnx.Rngs(7))


@pytest.fixture(scope="module")
def offloaded(model):
    return OffloadedModel(model)


def resident_generation(model, prompt, num_new_tokens, chunk=None):
    """Greedy tokens and the logits of each, from the resident model with a KV cache and the same passes."""
    cache = init_cache(model.config, prompt.shape[0], prompt.shape[1] + num_new_tokens - 1)
    chunk = chunk or prompt.shape[1]
    for start in range(0, prompt.shape[1], chunk):
        out = model.forward(jnp.asarray(prompt[:, start:start + chunk]), cache=cache)
        cache = out.cache
    tokens, logits = [], []
    for _ in range(num_new_tokens):
        last = np.asarray(out.logits[:, -1])
        logits.append(last)
        tokens.append(np.argmax(last, axis=-1).astype(np.int32))
        if len(tokens) < num_new_tokens:
            out = model.forward(jnp.asarray(tokens[-1][:, None]), cache=cache)
            cache = out.cache
    return np.stack(tokens, axis=1), np.stack(logits, axis=1)


@pytest.fixture(scope="module")
def resident(model):
    return resident_generation(model, PROMPT, NEW_TOKENS)


@pytest.fixture(scope="module")
def recorded(offloaded):
    """A run with speculative logits in its trace, for replays."""
    return offloaded_generate(offloaded, PROMPT, NEW_TOKENS, policy="lru", capacity=CAPACITY, record_speculative=True)


def flat_ids(values) -> list[int]:
    values = np.asarray(values)
    return values[values >= 0].tolist()


def assert_same_decisions(run, events):
    """Check every step's outcomes and victims (and prefetches, when simulated) against simulator events."""
    np.testing.assert_array_equal(run.outcomes(events.outcomes.shape[-1]), events.outcomes)
    for record in run.records:
        where = (record.pass_index, record.layer)
        assert record.victims.tolist() == flat_ids(events.victims[where]), f"victims at step {record.step}"
        if hasattr(events, "prefetched"):
            assert record.prefetched.tolist() == flat_ids(events.prefetched[where]), f"prefetches at step {record.step}"
            assert record.prefetch_victims.tolist() == flat_ids(events.prefetch_victims[where]), f"prefetch victims at step {record.step}"


@pytest.mark.parametrize("policy", LIVE_POLICIES)
def test_live_run_matches_resident_and_simulator(offloaded, resident, policy):
    run = offloaded_generate(offloaded, PROMPT, NEW_TOKENS, policy=policy, capacity=CAPACITY)
    tokens, logits = resident
    np.testing.assert_array_equal(run.tokens, tokens)
    np.testing.assert_allclose(run.logits, logits, rtol=1e-5, atol=1e-5)
    assert sum(record.victims.size for record in run.records) > 0, "the capacity should force evictions"

    config = SimConfig(policy, CAPACITY)
    (result,), events = run_sweep(run.trace, [config], record_events=True)
    assert_same_decisions(run, events[config])
    assert (result.requests, result.hits) == (run.requests, run.hits)


def test_belady_rejected_in_live_run(offloaded):
    with pytest.raises(ValueError, match="belady.*replay"):
        offloaded_generate(offloaded, PROMPT, NEW_TOKENS, policy="belady", capacity=CAPACITY)


def test_belady_replay_matches_simulator(offloaded, resident, recorded):
    run = offloaded_generate(offloaded, PROMPT, NEW_TOKENS, policy="belady", capacity=CAPACITY, replay=recorded.trace)
    np.testing.assert_array_equal(run.tokens, resident[0])
    config = SimConfig("belady", CAPACITY)
    (result,), events = run_sweep(recorded.trace, [config], record_events=True)
    assert_same_decisions(run, events[config])
    lru = offloaded_generate(offloaded, PROMPT, NEW_TOKENS, policy="lru", capacity=CAPACITY)
    assert run.hits >= lru.hits


@pytest.mark.parametrize("policy", policy_names())
def test_oracle_prefetch_matches_simulator(offloaded, resident, recorded, policy):
    run = offloaded_generate(
        offloaded, PROMPT, NEW_TOKENS, policy=policy, capacity=CAPACITY, replay=recorded.trace,
        prefetch="oracle", prefetch_lookahead=2, prefetch_budget=5,
    )
    np.testing.assert_array_equal(run.tokens, resident[0])
    np.testing.assert_allclose(run.logits, resident[1], rtol=1e-5, atol=1e-5)
    assert sum(record.prefetched.size for record in run.records) > 0

    config = SimConfig(policy, CAPACITY, prefetch=PrefetchConfig("oracle", lookahead=2, budget=5))
    (result,), events = run_sweep(recorded.trace, [config], record_events=True)
    assert_same_decisions(run, events[config])
    assert result.prefetches == sum(record.prefetched.size for record in run.records)


@pytest.mark.parametrize("policy", ["lru", "least-stale", "s3fifo"])
def test_gate_prefetch_matches_simulator(offloaded, resident, policy):
    run = offloaded_generate(offloaded, PROMPT, NEW_TOKENS, policy=policy, capacity=CAPACITY, prefetch="gate", prefetch_budget=3)
    np.testing.assert_array_equal(run.tokens, resident[0])
    assert run.trace.speculative_logits is not None

    # The simulator's gate-speculative prefetcher reads the speculative logits the run recorded.
    config = SimConfig(policy, CAPACITY, prefetch=PrefetchConfig("gate-speculative", budget=3))
    _, events = run_sweep(run.trace, [config], record_events=True)
    assert_same_decisions(run, events[config])


def test_prefetched_experts_are_hits(offloaded, recorded):
    run = offloaded_generate(
        offloaded, PROMPT, NEW_TOKENS, policy="lru", capacity=CAPACITY, replay=recorded.trace, prefetch="oracle", prefetch_lookahead=1,
    )
    plain = offloaded_generate(offloaded, PROMPT, NEW_TOKENS, policy="lru", capacity=CAPACITY)
    assert run.hits > plain.hits
    used = [t for t in run.transfers if t.kind == 1 and t.consumer_step >= 0]
    assert used, "some prefetch should be consumed by a later step"
    for transfer in used:
        record = run.records[transfer.consumer_step]
        position = record.requests.tolist().index(transfer.flat_id)
        assert record.outcomes[position] == OUTCOME_HIT


def test_custom_prefetcher_hook(offloaded, resident, recorded):
    """A prefetcher built outside the runtime: the oracle source and the engine's prefetch phase, plus a no-op hook."""
    policy, params = resolve_policy("least-stale")
    num_steps = recorded.trace.num_passes * CONFIG.num_moe_layers
    requests = build_requests(recorded.trace)
    contexts = []

    def hook(context):
        contexts.append(context.step)
        engine = hook.engine
        return engine(context)

    hook.engine = EnginePrefetcher(
        policy, params, OracleCandidates(requests, CONFIG.num_experts, 1), num_layers=CONFIG.num_moe_layers,
        num_experts=CONFIG.num_experts, num_steps=num_steps, max_candidates=CONFIG.num_experts,
    )
    run = offloaded_generate(offloaded, PROMPT, NEW_TOKENS, policy="least-stale", capacity=CAPACITY, prefetcher=hook)
    np.testing.assert_array_equal(run.tokens, resident[0])
    assert contexts == list(range(num_steps))
    builtin = offloaded_generate(
        offloaded, PROMPT, NEW_TOKENS, policy="least-stale", capacity=CAPACITY, replay=recorded.trace, prefetch="oracle",
    )
    assert [r.outcomes.tolist() for r in run.records] == [r.outcomes.tolist() for r in builtin.records]

    noop = offloaded_generate(
        offloaded, PROMPT, NEW_TOKENS, policy="least-stale", capacity=CAPACITY,
        prefetcher=lambda context: PrefetchDecision(context.pool, np.zeros(0, np.int32), np.zeros(0, np.int32)),
    )
    plain = offloaded_generate(offloaded, PROMPT, NEW_TOKENS, policy="least-stale", capacity=CAPACITY)
    assert [r.outcomes.tolist() for r in noop.records] == [r.outcomes.tolist() for r in plain.records]


@pytest.mark.parametrize(
    "make_decision, message",
    [
        (lambda c: (c.requested[:1], np.zeros(0, np.int32)), "prefetches of resident items"),
        (lambda c: (np.zeros(0, np.int32), c.requested[:1]), "victims requested in this step"),
        (lambda c: (np.array([23, 23], np.int32), np.zeros(0, np.int32)), "repeated prefetches"),
        (lambda c: (np.array([99], np.int32), np.zeros(0, np.int32)), "outside"),
    ],
)
def test_invalid_prefetcher_output_rejected(offloaded, make_decision, message):
    def hook(context):
        prefetch, victims = make_decision(context)
        return PrefetchDecision(context.pool, prefetch, victims)

    with pytest.raises(ValueError, match=message):
        offloaded_generate(offloaded, PROMPT, NEW_TOKENS, policy="lru", capacity=CAPACITY, prefetcher=hook)


def test_prefill_chunks(offloaded, model):
    tokens, logits = resident_generation(model, PROMPT, 4, chunk=4)
    run = offloaded_generate(offloaded, PROMPT, 4, policy="fifo", capacity=6, prefill_chunk=4)
    assert np.diff(run.trace.pass_offsets).tolist() == [4, 2, 1, 1, 1]
    assert run.trace.pass_kind.tolist() == [0, 0, 1, 1, 1]
    np.testing.assert_array_equal(run.tokens, tokens)
    np.testing.assert_allclose(run.logits, logits, rtol=1e-5, atol=1e-5)


def test_capacity_smaller_than_request_set(offloaded):
    with pytest.raises(CapacityError, match="smaller than the .* distinct experts requested at pass 0"):
        offloaded_generate(offloaded, PROMPT, 2, policy="lru", capacity=3)


def test_replay_of_another_prompt_rejected(offloaded, recorded):
    other = np.array([[7, 7, 2, 8, 1, 8]], np.int32)
    with pytest.raises(ValueError, match="routing left the replay trace"):
        offloaded_generate(offloaded, other, NEW_TOKENS, policy="belady", capacity=CAPACITY, replay=recorded.trace)
    with pytest.raises(ValueError, match="passes"):
        offloaded_generate(offloaded, PROMPT, NEW_TOKENS + 1, policy="belady", capacity=CAPACITY, replay=recorded.trace)


def test_oracle_needs_replay(offloaded):
    with pytest.raises(ValueError, match="replay"):
        offloaded_generate(offloaded, PROMPT, 2, policy="lru", capacity=CAPACITY, prefetch="oracle")


def test_host_weights_read_only_and_unchanged(model, offloaded, recorded):
    for array in offloaded.host.weights:
        assert not array.flags.writeable
        with pytest.raises(ValueError):
            array[0, 0, 0, 0] = 1.0
    expected = HostExperts.from_model(model)
    for host_copy, fresh in zip(offloaded.host.weights, expected.weights):
        np.testing.assert_array_equal(host_copy, fresh)


def test_every_request_moved_or_resident(recorded):
    """Bytes moved = transfers x expert size, and every miss is one demand transfer."""
    misses = sum(int(np.count_nonzero(r.outcomes != OUTCOME_HIT)) for r in recorded.records)
    demand = [t for t in recorded.transfers if t.kind == 0]
    assert len(demand) == misses
    assert recorded.bytes_moved == len(recorded.transfers) * recorded.expert_bytes
    assert recorded.expert_bytes == 3 * CONFIG.hidden_size * CONFIG.expert_hidden_size * 4


SECOND_DEVICE_SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
    from flax import nnx
    from specmd_jax.model import ModelConfig, MoeTransformer, greedy_generate
    from specmd_jax.runtime import Link, OffloadedModel, offloaded_generate
    config = ModelConfig(name="t", vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                         num_experts=8, top_k=2, expert_hidden_size=16, max_seq_len=32)
    model = MoeTransformer(config, rngs=nnx.Rngs(1))
    device = jax.devices()[1]
    offloaded = OffloadedModel(model, device)
    prompt = np.array([[1, 2, 3, 4]], np.int32)
    run = offloaded_generate(offloaded, prompt, 4, policy="lru", capacity=8, link=Link(device, 1e9))
    assert {array.device for transfer in run.transfers for array in transfer.arrays} == {device}
    expected = greedy_generate(model, prompt, 4).tokens
    assert np.array_equal(run.tokens, expected), (run.tokens, expected)
    print("cache device id", device.id)
    """
)


def test_cache_on_second_cpu_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SECOND_DEVICE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cache device id 1" in result.stdout


def _accelerators():
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


@pytest.mark.skipif(not _accelerators(), reason="needs a GPU; this process sees none")
def test_gpu_run_matches_resident(model, resident):
    device = _accelerators()[0]
    offloaded = OffloadedModel(model, device)
    run = offloaded_generate(offloaded, PROMPT, NEW_TOKENS, policy="least-stale", capacity=CAPACITY, link=Link(device))
    np.testing.assert_array_equal(run.tokens, resident[0])
    np.testing.assert_allclose(run.logits, resident[1], rtol=1e-3, atol=1e-3)
    assert all(array.device == device for array in run.transfers[0].arrays)

"""Tests of offloaded generation: tokens and logits against the resident model, and every decision
against the simulator (`run_sweep` on the trace the run recorded)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from specmd_jax.model import ModelConfig, MoeTransformer, init_cache
from specmd_jax.policies.registry import policy_names
from specmd_jax.prefetch.registry import PREFETCHERS, PrefetchConfig
from specmd_jax.runtime import (
    EnginePrefetcher, HostExperts, Link, OffloadedModel, OracleCandidates, PrefetchDecision, offloaded_generate,
)
from specmd_jax.runtime.manager import resolve_policy
from specmd_jax.runtime.prefetch import TableCandidates
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


def learned_table(trace, lookahead: int = 3) -> np.ndarray:
    """A hand-made float32 [T, L, D, E] table for the `learned` prefetcher: random scores, a few exact zeros."""
    generator = np.random.default_rng(11)
    shape = (trace.num_passes, trace.num_layers, lookahead, trace.num_experts)
    table = generator.uniform(0.0, 1.0, shape).astype(np.float32)
    table[generator.uniform(size=shape) < 0.2] = 0.0
    return table


# (prefetcher, policy, PrefetchConfig fields, train fraction). Every registry prefetcher runs at least
# under LRU and Least-Stale, and with a budget and lookahead 2.
TABLE_CASES = [
    ("oracle", "lru", {"lookahead": 2, "budget": 4}, None),
    ("oracle", "least-stale", {}, None),
    ("top-k", "lru", {}, None),
    ("top-k", "least-stale", {"lookahead": 2, "budget": 3}, None),
    ("top-k", "belady", {"budget": 2, "top_k": 4}, None),
    ("score", "lru", {}, None),
    ("score", "least-stale", {"lookahead": 2, "budget": 3, "threshold": 0.5}, None),
    ("score", "random", {}, 0.5),
    ("previous-pass", "lru", {}, None),
    ("previous-pass", "least-stale", {"budget": 2}, None),
    ("co-occurrence", "lru", {"top_k": 3}, None),
    ("co-occurrence", "least-stale", {"lookahead": 2, "budget": 3}, 0.5),
    ("co-occurrence", "s3fifo", {"lookahead": 3}, None),
    ("gate-speculative", "lru", {}, None),
    ("gate-speculative", "least-stale", {"lookahead": 2, "budget": 3}, None),
    ("learned", "lru", {"lookahead": 2}, None),
    ("learned", "least-stale", {"lookahead": 2, "budget": 3, "top_k": 3}, None),
]


def test_table_cases_cover_every_prefetcher():
    assert {case[0] for case in TABLE_CASES} == set(PREFETCHERS)


@pytest.mark.parametrize("name, policy, fields, train_fraction", TABLE_CASES, ids=lambda value: str(value))
def test_replayed_prefetcher_matches_simulator(offloaded, resident, recorded, name, policy, fields, train_fraction):
    score_tables = {"learned": learned_table(recorded.trace)}
    fraction = {} if train_fraction is None else {"train_fraction": train_fraction}
    run = offloaded_generate(
        offloaded, PROMPT, NEW_TOKENS, policy=policy, capacity=CAPACITY, replay=recorded.trace, prefetch=name,
        prefetch_lookahead=fields.get("lookahead", 1), prefetch_budget=fields.get("budget"),
        prefetch_top_k=fields.get("top_k"), prefetch_threshold=fields.get("threshold", 0.9),
        score_tables=score_tables, **fraction,
    )
    np.testing.assert_array_equal(run.tokens, resident[0])
    np.testing.assert_allclose(run.logits, resident[1], rtol=1e-5, atol=1e-5)
    prefetches = sum(record.prefetched.size for record in run.records)
    assert prefetches > 0, "the case should prefetch, or it checks only the demand phase"
    if "budget" in fields:
        assert max(record.prefetched.size for record in run.records) <= fields["budget"]

    config = SimConfig(policy, CAPACITY, prefetch=PrefetchConfig(name, **fields))
    (result,), events = run_sweep(recorded.trace, [config], record_events=True, score_tables=score_tables, **fraction)
    assert_same_decisions(run, events[config])
    assert (result.requests, result.hits) == (run.requests, run.hits)
    assert result.prefetches == prefetches


def test_learned_table_changes_decisions(offloaded, recorded):
    """The learned prefetcher follows the table it is given: two tables give other prefetches."""
    first = learned_table(recorded.trace, 1)
    runs = [
        offloaded_generate(
            offloaded, PROMPT, NEW_TOKENS, policy="lru", capacity=CAPACITY, replay=recorded.trace, prefetch="learned",
            score_tables={"learned": table},
        )
        for table in (first, first[..., ::-1].copy())
    ]
    assert [r.prefetched.tolist() for r in runs[0].records] != [r.prefetched.tolist() for r in runs[1].records]


def test_table_candidates_hand_worked():
    """Step 0 of a 2-layer, 4-expert table scores layer 1 (flat ids 4 .. 7) at lookahead 1.

    Scores 0.1, 0.7, 0.7, 0.4 with top-3: the ranking is expert 1, 2 (tie, smaller id first), 3. Expert 2
    (flat 6) is resident, so it is proposed first, to be protected, then flat 5 and 7 in priority order.
    """
    scores = np.zeros((2, 2, 1, 4), np.float32)
    scores[0, 0, 0] = [0.1, 0.7, 0.7, 0.4]
    resident = np.zeros(8, bool)
    resident[[0, 6]] = True
    source = TableCandidates(scores, "top-k", top_k=3, threshold=0.9, budget=8, num_layers=2)
    context = SimpleNamespace(step=0, pool=SimpleNamespace(resident=jnp.asarray(resident)))
    flat, targets = source(context)
    assert flat.tolist() == [6, 5, 7]
    assert targets[1:].tolist() == [1, 1]

    limited = TableCandidates(scores, "top-k", top_k=3, threshold=0.9, budget=1, num_layers=2)
    assert limited(context)[0].tolist() == [6, 5]
    everything = TableCandidates(scores, "all", top_k=1, threshold=0.9, budget=8, num_layers=2)
    assert everything(context)[0].tolist() == [6, 5, 7, 4]
    # Mass 0.5 of the total 1.9 is 0.95. Expert 1 alone scores 0.7 < 0.95, so expert 2 is selected too,
    # and the two score 1.4 >= 0.95, so expert 3 is not.
    mass = TableCandidates(scores, "mass", top_k=1, threshold=0.5, budget=8, num_layers=2)
    assert mass(context)[0].tolist() == [6, 5]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"scores": np.zeros((2, 3, 1, 4), np.float32)}, r"expected 2 layers on axis 1 .* got shape \(2, 3, 1, 4\)"),
        ({"scores": np.zeros((5, 1, 4), np.float32)}, r"\[T \* L, D, E\] with L = 2"),
        ({"scores": np.full((2, 2, 1, 4), -1.0, np.float32)}, r"finite scores >= 0, got -1.0 at index \(0, 0, 0\)"),
        ({"scores": np.full((2, 2, 1, 4), np.nan, np.float32)}, r"finite scores >= 0, got nan"),
        ({"selection": "best"}, r"invalid selection 'best'"),
        ({"top_k": 0}, r"top_k: expected an integer >= 1, got 0"),
        ({"budget": -1}, r"budget: expected an integer >= 0, got -1"),
        ({"threshold": 1.5}, r"threshold: expected a number in \(0, 1\], got 1.5"),
    ],
)
def test_table_candidates_rejects_bad_input(changes, message):
    arguments = {"scores": np.zeros((2, 2, 1, 4), np.float32), "selection": "top-k", "top_k": 2, "threshold": 0.9, "budget": 2}
    arguments.update(changes)
    with pytest.raises(ValueError, match=message):
        TableCandidates(
            arguments["scores"], arguments["selection"], top_k=arguments["top_k"], threshold=arguments["threshold"],
            budget=arguments["budget"], num_layers=2,
        )


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"prefetch": "co-occurrence"}, r"prefetch 'co-occurrence' builds its score table from a recorded trace: pass replay=trace"),
        ({"prefetch": "nearest"}, r"invalid prefetch 'nearest'"),
        ({"prefetch": "gate", "prefetch_lookahead": 2}, r"gate .* needs 1, got 2"),
        ({"prefetch": "gate", "prefetch_top_k": 0}, r"prefetch_top_k: expected an integer >= 1 .* got 0"),
        ({"prefetch": "gate", "prefetch_budget": -1}, r"prefetch_budget: expected an integer >= 0 .* got -1"),
        ({"prefetch": "gate", "prefetch_threshold": 0.0}, r"prefetch_threshold: expected a number in \(0, 1\], got 0.0"),
    ],
)
def test_prefetch_settings_rejected(offloaded, settings, message):
    with pytest.raises(ValueError, match=message):
        offloaded_generate(offloaded, PROMPT, 2, policy="lru", capacity=CAPACITY, **settings)


def test_replayed_prefetch_settings_rejected(offloaded, recorded):
    replay = dict(policy="lru", capacity=CAPACITY, replay=recorded.trace)
    with pytest.raises(ValueError, match=r"prefetch_lookahead: expected an integer in \[1, 3\] .* got 4"):
        offloaded_generate(offloaded, PROMPT, NEW_TOKENS, prefetch="oracle", prefetch_lookahead=4, **replay)
    with pytest.raises(ValueError, match=r"'learned' needs a score table: pass score_tables=\{'learned': table\}"):
        offloaded_generate(offloaded, PROMPT, NEW_TOKENS, prefetch="learned", **replay)
    with pytest.raises(ValueError, match=r"score table 'learned': expected shape \(6, 3, D, 8\)"):
        offloaded_generate(
            offloaded, PROMPT, NEW_TOKENS, prefetch="learned", score_tables={"learned": np.zeros((6, 3, 1, 5), np.float32)}, **replay,
        )
    with pytest.raises(ValueError, match=r"train_fraction=0.1 of 6 passes leaves 0 passes to train on"):
        offloaded_generate(offloaded, PROMPT, NEW_TOKENS, prefetch="top-k", train_fraction=0.1, **replay)
    plain = offloaded_generate(offloaded, PROMPT, NEW_TOKENS, policy="lru", capacity=CAPACITY)
    with pytest.raises(ValueError, match=r"has no speculative_logits"):
        offloaded_generate(offloaded, PROMPT, NEW_TOKENS, prefetch="gate-speculative", **{**replay, "replay": plain.trace})


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

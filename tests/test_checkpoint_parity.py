"""Parity of imported checkpoints with the transformers implementation (CPU torch).

Tiny random models are built with transformers, saved with `save_pretrained`, imported, and run on
the same tokens. Tolerance: float32 logits and router logits agree within atol 2e-4 (measured
differences are about 1e-6; the bound leaves room for other BLAS builds).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need torch (pip install -e '.[test]')")
transformers = pytest.importorskip("transformers", reason="parity tests need transformers (pip install -e '.[test]')")

import jax.numpy as jnp  # noqa: E402

from specmd_jax.checkpoints import load_hf_checkpoint  # noqa: E402
from specmd_jax.model import greedy_generate  # noqa: E402

ATOL = 2e-4
COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128)

MODELS = {
    "olmoe": lambda: transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
        **COMMON, intermediate_size=16, num_experts=16, num_experts_per_tok=4)),
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **COMMON, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2, rope_theta=1e6)),
    "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **COMMON, intermediate_size=40, moe_intermediate_size=12, num_experts=8, num_experts_per_tok=3,
        norm_topk_prob=True, head_dim=16, mlp_only_layers=[1])),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def saved_model(request, tmp_path_factory):
    torch.manual_seed(0)
    model = MODELS[request.param]().eval()
    # Random routers at the default init scale give near-uniform logits. Scaling them up makes
    # clear margins decide the top-k selection, so the comparison exercises it.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gate.weight") and "shared" not in name:
                parameter.mul_(20.0)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    return request.param, model, directory


def test_logits_and_router_logits_match(saved_model):
    name, reference, directory = saved_model
    tokens = np.random.default_rng(1).integers(0, COMMON["vocab_size"], (2, 13))
    with torch.no_grad():
        expected = reference(torch.tensor(tokens), output_router_logits=True, attn_implementation="eager")
    model = load_hf_checkpoint(directory, dtype="float32")
    out = model.forward(jnp.asarray(tokens, jnp.int32), record=True)

    np.testing.assert_allclose(np.asarray(out.logits), expected.logits.numpy(), atol=ATOL, rtol=0)
    hf_router = np.stack([r.numpy() for r in expected.router_logits], axis=1)  # [B * S, L, E]
    ours = np.asarray(out.routing.router_logits).reshape(hf_router.shape)
    np.testing.assert_allclose(ours, hf_router, atol=ATOL, rtol=0)
    assert model.config.num_moe_layers == hf_router.shape[1], name


def test_greedy_generation_matches(saved_model):
    _, reference, directory = saved_model
    prompt = np.array([[5, 17, 2, 40, 33, 8]])
    reference.generation_config.eos_token_id = None  # generate all 5 tokens even past an end-of-text id
    with torch.no_grad():
        expected = reference.generate(torch.tensor(prompt), max_new_tokens=5, do_sample=False, pad_token_id=0)
    model = load_hf_checkpoint(directory, dtype="float32")
    generation = greedy_generate(model, prompt, 5)
    np.testing.assert_array_equal(generation.tokens, expected[:, prompt.shape[1]:].numpy())


def test_bfloat16_import_close_to_float32(saved_model):
    _, _, directory = saved_model
    tokens = jnp.arange(10, dtype=jnp.int32)[None, :]
    full = load_hf_checkpoint(directory, dtype="float32")(tokens)
    half = load_hf_checkpoint(directory, dtype="bfloat16")
    assert half.embed_tokens.embedding[...].dtype == jnp.bfloat16
    # bfloat16 keeps 8 mantissa bits; logits of this tiny model are O(1), so 0.1 is a loose bound.
    np.testing.assert_allclose(np.asarray(half(tokens)), np.asarray(full), atol=0.1)

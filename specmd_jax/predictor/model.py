"""The learned next-layer expert predictor (Flax NNX) and its cost next to one MoE layer.

Input: the step features of `build_features`, [B, L, F] for B passes. Output: logits [B, L, D, E],
one row of expert logits for each offset j = 1 .. D after each issuing layer.

Two layouts share one code path:
- per-layer heads (the default): every issuing layer has its own output weights, so the expert ids of
  layer l + j are learned separately for each l.
- shared: one set of weights for all layers. A learned layer embedding identifies the issuing layer: it
  is added to the hidden pre-activation, or used as a per-layer output bias when there is no hidden layer.
With `hidden` > 0 a GELU hidden layer, shared by all layers, comes first.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from specmd_jax.predictor.features import FEATURE_SOURCES, feature_width
from specmd_jax.timing.models import ModelShape

LOSSES = ("softmax", "sigmoid")
"""Training losses: softmax cross-entropy against the normalised request set (listwise), or per-expert sigmoid."""


class ConfigValueError(ValueError):
    """An invalid settings field, with the settings class, the field and the reason kept apart.

    The message reads `Owner.field: detail`. The command line uses `field` to name its option instead.
    """

    def __init__(self, owner: str, field: str, detail: str):
        super().__init__(f"{owner}.{field}: {detail}")
        self.owner = owner
        self.field = field
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class PredictorConfig:
    """Shape and inputs of a predictor; stored in every checkpoint.

    Attributes:
      num_layers, num_experts: L and E of the traces it predicts.
      lookahead: offsets D it predicts (1 .. D steps ahead).
      window: layers of router probabilities in the features (l, l - 1, ...).
      feature_source: router signal of the features, one of `FEATURE_SOURCES`.
      hidden: width of the shared GELU hidden layer, or 0 for a linear model.
      per_layer_heads: separate output weights per issuing layer (True) or one shared model with a
        layer embedding (False).
      loss: one of `LOSSES`; it also sets how logits become scores (softmax or sigmoid).
    """

    num_layers: int
    num_experts: int
    lookahead: int = 3
    window: int = 3
    feature_source: str = "scores"
    hidden: int = 0
    per_layer_heads: bool = True
    loss: str = "softmax"

    def __post_init__(self):
        def reject(name: str, detail: str) -> ConfigValueError:
            return ConfigValueError("PredictorConfig", name, detail)

        for name, low in (("num_layers", 1), ("num_experts", 1), ("lookahead", 1), ("window", 1), ("hidden", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise reject(name, f"expected an integer >= {low}, got {value!r}")
        for name in ("lookahead", "window"):
            if getattr(self, name) > self.num_layers:
                raise reject(name, f"expected at most num_layers={self.num_layers} (the MoE layer count), got {getattr(self, name)}")
        if not isinstance(self.per_layer_heads, bool):
            raise reject("per_layer_heads", f"expected true or false, got {self.per_layer_heads!r}")
        if self.feature_source not in FEATURE_SOURCES:
            raise reject("feature_source", f"expected one of {', '.join(FEATURE_SOURCES)}, got {self.feature_source!r}")
        if self.loss not in LOSSES:
            raise reject("loss", f"expected one of {', '.join(LOSSES)}, got {self.loss!r}")

    @property
    def num_features(self) -> int:
        return feature_width(self.num_experts, self.window)

    @property
    def num_outputs(self) -> int:
        return self.lookahead * self.num_experts

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, origin: str) -> PredictorConfig:
        """Build a config from its `to_dict` form; raise ValueError naming `origin` on any bad field."""
        if not isinstance(data, dict):
            raise ValueError(f"{origin}: field 'model': expected a JSON object, got {type(data).__name__}")
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(data.keys() - names)
        missing = sorted({"num_layers", "num_experts"} - data.keys())
        if unknown or missing:
            raise ValueError(f"{origin}: field 'model': expected keys {sorted(names)}, got unknown {unknown}, missing {missing}")
        try:
            return cls(**data)
        except ConfigValueError as error:
            raise ValueError(f"{origin}: field 'model.{error.field}': {error.detail}") from None


class NextLayerPredictor(nnx.Module):
    """Map step features [B, L, F] to expert logits [B, L, D, E] (see the module docstring)."""

    def __init__(self, config: PredictorConfig, *, rngs: nnx.Rngs):
        self.config = config
        num_layers, head_inputs = config.num_layers, config.hidden or config.num_features
        if config.hidden:
            self.hidden = nnx.Linear(config.num_features, config.hidden, rngs=rngs)
            self.layer_embedding = nnx.Param(jnp.zeros((num_layers, config.hidden)))
        # A small output initialisation starts every expert near the uniform score.
        scale = 0.1 / head_inputs**0.5
        head_shape = (num_layers, head_inputs, config.num_outputs) if config.per_layer_heads else (head_inputs, config.num_outputs)
        self.head_kernel = nnx.Param(scale * jax.random.normal(rngs.params(), head_shape))
        self.head_bias = nnx.Param(jnp.zeros((num_layers, config.num_outputs)))

    def __call__(self, features: jax.Array) -> jax.Array:
        config = self.config
        inputs = features
        if config.hidden:
            inputs = jax.nn.gelu(self.hidden(features) + self.layer_embedding[...])
        if config.per_layer_heads:
            logits = jnp.einsum("blf,lfo->blo", inputs, self.head_kernel[...])
        else:
            logits = inputs @ self.head_kernel[...]
        logits = logits + self.head_bias[...]
        return logits.reshape(*features.shape[:2], config.lookahead, config.num_experts)

    def scores(self, features: jax.Array) -> jax.Array:
        """Return non-negative scores [B, L, D, E]: softmax over experts, or per-expert sigmoid, as trained."""
        logits = self(features)
        return jax.nn.softmax(logits, axis=-1) if self.config.loss == "softmax" else jax.nn.sigmoid(logits)


def count_parameters(config: PredictorConfig) -> int:
    """Return the predictor's parameter count (all layers' heads included)."""
    model = nnx.eval_shape(lambda: NextLayerPredictor(config, rngs=nnx.Rngs(0)))
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


@dataclasses.dataclass(frozen=True)
class PredictorCost:
    """Size and per-token compute of a predictor next to one MoE layer of a model.

    The predictor runs once per token and layer, so its FLOPs per token are those of one issuing
    layer's prediction: 2 per multiply-add of the hidden layer (if any) and of that layer's head, plus
    the additions of the biases. The MoE layer's FLOPs per token count its router, its top-k routed
    experts and its shared experts (2 per weight per token). Its parameters count the router, all
    routed experts and the shared experts.
    """

    parameters: int
    flops_per_token: int
    moe_layer_parameters: int
    moe_layer_flops_per_token: int

    @property
    def parameter_fraction(self) -> float:
        return self.parameters / self.moe_layer_parameters

    @property
    def flops_fraction(self) -> float:
        return self.flops_per_token / self.moe_layer_flops_per_token


def predictor_cost(config: PredictorConfig, model: ModelShape) -> PredictorCost:
    """Compare the predictor's parameters and FLOPs per token with one MoE layer of `model`."""
    if (model.num_moe_layers, model.num_experts) != (config.num_layers, config.num_experts):
        raise ValueError(
            f"model shape {model.name} has {model.num_moe_layers} MoE layers of {model.num_experts} experts, "
            f"but the predictor has {config.num_layers} layers of {config.num_experts} experts"
        )
    head_inputs = config.hidden or config.num_features
    flops = 2 * head_inputs * config.num_outputs + config.num_outputs
    if config.hidden:
        flops += 2 * config.num_features * config.hidden + 2 * config.hidden
    expert_weights = 3 * model.hidden * model.expert_ffn
    shared_weights = model.num_shared_experts * 3 * model.hidden * model.shared_expert_ffn
    router_weights = model.hidden * model.num_experts
    layer_parameters = router_weights + model.num_experts * expert_weights + shared_weights
    layer_flops = 2 * (router_weights + model.top_k * expert_weights + shared_weights)
    return PredictorCost(
        parameters=count_parameters(config),
        flops_per_token=flops,
        moe_layer_parameters=layer_parameters,
        moe_layer_flops_per_token=layer_flops,
    )

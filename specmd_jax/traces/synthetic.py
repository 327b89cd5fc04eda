"""Synthetic routing traces: the embedded default when no measured trace is given.

A synthetic trace is drawn from a small generative model whose parameters come from published routing
statistics of real MoE models (see the presets below). Generation is deterministic for a seed and a
given numpy version.

Model, per MoE layer l and token t:
  popularity    Layer l has fixed expert weights w_l: a Zipf-Mandelbrot law w(r) ~ (r + b)^-s over
                popularity ranks r, with a random rank -> expert assignment per layer. s and b are fitted
                so that the expected load max/mean (and, if given, the load entropy) meets the target.
  fresh draw    A token selects top_k distinct experts by Plackett-Luce sampling from w_l (exponential
                race: the top_k smallest Exp(1) / w_e), which also orders them into ranks.
  cross-layer   With probability `cross_layer_follow`, rank slot r of a token at layer l + 1 is the image
                of its layer-l slot-r expert under a fixed transition: the expert of the same popularity
                rank at layer l + 1. The other slots are a fresh draw among the remaining experts.
  temporal      With probability `temporal_reuse`, a decode token routes to exactly the experts of the
                previous token of its sequence at the same layer (all top_k slots), instead of the above.

Trace layout: `num_sequences` sequences run one after another. Each has one prefill pass of
`prompt_tokens` tokens (none when 0), then `decode_tokens` decode passes of one token.

A spec string selects a preset and optional overrides, for example
  synthetic:olmoe-1b-7b
  synthetic:olmoe-1b-7b?passes=2000&seed=3
  synthetic:mixtral-8x7b?sequences=4&prompt=64&decode=1024&temporal_reuse=0.3
`SPEC_OPTIONS` lists the option names.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np

from specmd_jax.traces.trace import PASS_DECODE, PASS_PREFILL, Trace, TraceError, TraceMetadata, make_trace

SPEC_PREFIX = "synthetic"
DEFAULT_PRESET = "olmoe-1b-7b"
DEFAULT_SPEC = f"{SPEC_PREFIX}:{DEFAULT_PRESET}"

# ---------------------------------------------------------------------------------------------------
# Published routing statistics behind the presets. Load = number of tokens whose top-k contains the
# expert; max/mean and entropy (bits) are over the experts of one layer.
# ---------------------------------------------------------------------------------------------------

# OLMoE-1B-7B-0924 (16 layers, 64 experts, top-8) on 208,896 C4 tokens, from the expert counts of the
# OLMoE routing analysis (Muennighoff et al. 2024, allenai/OLMoE scripts/run_routing_analysis.py).
# Only layers 0, 7 and 15 were published. C4 is the least skewed of its five domains: layer-0 max/mean
# is 3.02 on C4, 3.63 on books, 5.01 on GitHub, 6.18 on Wikipedia and 7.81 on arXiv.
OLMOE_MEASURED_LAYERS = (0, 7, 15)
OLMOE_C4_LOAD_MAX_MEAN = (3.017, 2.658, 2.499)
OLMOE_C4_LOAD_ENTROPY_BITS = (5.938, 5.890, 5.810)  # uniform: log2(64) = 6

# Mixtral-8x7B-v0.1 (32 layers, 8 experts, top-2) on 208,896 C4 tokens, same source and layers.
MIXTRAL_MEASURED_LAYERS = (0, 7, 15)
MIXTRAL_C4_LOAD_MAX_MEAN = (1.121, 1.076, 1.124)
MIXTRAL_C4_LOAD_ENTROPY_BITS = (2.993, 2.999, 2.981)  # uniform: log2(8) = 3

# Mixtral-8x7B-Instruct decode routing on HumanEval problems 0 and 1 (338 decode tokens, greedy vLLM),
# from the speculative-moe trace collection (Mario928/speculative-moe, routing_data_collected). The
# mean overlap of the expert sets of consecutive decode tokens at one layer is 0.40 (0.34 on GSM8K),
# against 0.25 for independent uniform top-2-of-8 draws.
MIXTRAL_DECODE_OVERLAP = 0.40
MIXTRAL_UNIFORM_OVERLAP = 2 / 8
# The same trace, top-1 lookup layer l -> l + 1 (trained on the first half of the tokens, tested on the
# second half, averaged over the 31 layer pairs): accuracy 0.216 against 0.150 for always predicting the
# majority expert. The layer-(l + 1) top-1 distribution has collision probability sum(p^2) = 0.149 on
# average. Only 169 test tokens per pair, so this is a rough estimate.
MIXTRAL_NEXT_LAYER_ACCURACY = 0.216
MIXTRAL_TOP1_COLLISION = 0.149
# The same decode trace is more skewed than the base model on C4: max/mean load 1.47 averaged over the
# 32 layers. A target of 1.43 reproduces it at the trace's 338 tokens, where sampling noise adds about
# 0.04 (measured with traces stats over seeds 0-2). Its next-layer accuracy is reproduced with a follow
# probability of 0.17 (0.16 measured 0.200 against the real 0.216); the 0.079 that the accuracy formula
# gives (MIXTRAL_NEXT_LAYER_ACCURACY against MIXTRAL_TOP1_COLLISION) ignores the lookup table's learning
# error on so few tokens.
MIXTRAL_DECODE_LOAD_MAX_MEAN = 1.43
MIXTRAL_DECODE_CROSS_LAYER_FOLLOW = 0.17

# Qwen3-30B-A3B (48 layers, 128 experts, top-8), per-expert decode "heat" over 75,773 decode tokens of
# 200 databricks-dolly-15k prompts (llama.cpp, IQ3_XXS), from doramirdor/mbolt
# results/colibri-119/coactivation_qwen3-30b-a3b.json. Max/mean and entropy computed from the heat
# counts of every layer (uniform entropy: log2(128) = 7).
QWEN3_LOAD_MAX_MEAN = (
    3.07, 3.87, 3.97, 4.65, 7.38, 7.12, 7.45, 6.00, 6.11, 6.51, 6.45, 5.85,
    7.47, 4.94, 5.71, 4.91, 5.97, 4.80, 5.89, 5.82, 6.13, 6.98, 5.44, 6.76,
    7.71, 4.78, 5.87, 4.57, 5.66, 4.55, 6.17, 5.54, 5.75, 6.70, 5.30, 7.42,
    5.96, 5.48, 4.54, 4.72, 5.57, 4.89, 4.28, 4.75, 4.55, 5.17, 6.36, 4.56,
)
QWEN3_LOAD_ENTROPY_BITS = (
    6.632, 6.495, 6.353, 6.335, 6.226, 6.234, 6.210, 6.257, 6.338, 6.223, 6.208, 6.301,
    6.181, 6.152, 6.244, 6.246, 6.184, 6.280, 6.196, 6.279, 6.290, 6.226, 6.174, 6.252,
    6.113, 6.149, 6.185, 6.214, 6.224, 6.275, 6.218, 6.273, 6.307, 6.252, 6.191, 6.216,
    6.177, 6.161, 6.201, 6.209, 6.147, 6.179, 6.137, 6.171, 6.131, 6.177, 6.158, 6.073,
)

# FLAME-MoE-290M (8 MoE layers, 64 experts, top-6), final checkpoint (iteration 5473), one 2,048-token
# teacher-forced training sequence from CMU-FLAME/FLAME-MoE-Traces (Kang, Yu, Xiong 2025,
# arXiv:2505.20225), as excerpted by Akash-N-Pai/DynaNDE-Simulator. Per-layer figures computed with
# `specmd_jax.traces.stats` definitions.
# NOTE: 2,048 tokens give about 192 selections per expert, so sampling noise alone raises the measured
# max/mean of a near-uniform layer by roughly 0.1-0.2; these targets are upper estimates.
FLAME_LOAD_MAX_MEAN = (1.865, 1.661, 1.375, 1.427, 1.391, 1.458, 1.432, 1.594)
FLAME_LOAD_ENTROPY_BITS = (5.945, 5.975, 5.978, 5.977, 5.977, 5.963, 5.958, 5.955)
# Consecutive-token overlap, mean over the 8 layers: 0.1056 (0.100-0.111 per layer), against 0.0980
# expected by chance from each layer's own load distribution and 6/64 = 0.094 for uniform draws.
FLAME_TOKEN_OVERLAP = 0.1056
FLAME_CHANCE_OVERLAP = 0.0980
# Top-1 lookup layer l -> l + 1 (trained on tokens 0-1023, tested on 1024-2047), per layer pair; the
# majority baseline scores 0.019-0.047. Collision probability sum(p^2) of the layer-(l + 1) top-1
# distribution over all 2,048 tokens, per pair.
FLAME_NEXT_LAYER_ACCURACY = (0.0664, 0.1416, 0.1826, 0.2080, 0.1729, 0.1875, 0.1826)
FLAME_TOP1_COLLISION = (0.0200, 0.0196, 0.0196, 0.0196, 0.0192, 0.0198, 0.0189)


def reuse_probability_from_overlap(overlap: float, chance_overlap: float) -> float:
    """Convert a measured consecutive-token overlap into the `temporal_reuse` probability.

    With whole-set reuse at probability p and otherwise independent draws, the expected overlap is
    p + (1 - p) * chance_overlap, so p = (overlap - chance_overlap) / (1 - chance_overlap).
    """
    return max(0.0, (overlap - chance_overlap) / (1.0 - chance_overlap))


def follow_probability_from_accuracy(accuracy: float, top1_collision: float) -> float:
    """Convert a next-layer top-1 lookup accuracy into the `cross_layer_follow` probability.

    A followed top-1 is predicted right, and an independent one matches the prediction with about the
    collision probability sum(p^2) of the top-1 distribution, so accuracy ~ p + (1 - p) * collision.
    This ignores the learning error of a lookup table trained on few tokens.
    """
    return max(0.0, (accuracy - top1_collision) / (1.0 - top1_collision))


def _interpolate_layers(measured_layers: tuple[int, ...], values: tuple[float, ...], num_layers: int) -> tuple[float, ...]:
    """Interpolate per-layer figures measured at a few layers linearly; hold the ends constant."""
    return tuple(round(float(x), 4) for x in np.interp(np.arange(num_layers), measured_layers, values))


MIXTRAL_TEMPORAL_REUSE = round(reuse_probability_from_overlap(MIXTRAL_DECODE_OVERLAP, MIXTRAL_UNIFORM_OVERLAP), 3)  # 0.2
FLAME_TEMPORAL_REUSE = round(reuse_probability_from_overlap(FLAME_TOKEN_OVERLAP, FLAME_CHANCE_OVERLAP), 3)  # 0.008
# With the decode skew, chance overlap from the trace's own load is 0.270 (traces stats), not 0.25.
MIXTRAL_DECODE_CHANCE_OVERLAP = 0.270
MIXTRAL_DECODE_TEMPORAL_REUSE = round(reuse_probability_from_overlap(MIXTRAL_DECODE_OVERLAP, MIXTRAL_DECODE_CHANCE_OVERLAP), 3)  # 0.178
FLAME_CROSS_LAYER_FOLLOW = tuple(
    round(follow_probability_from_accuracy(a, c), 3) for a, c in zip(FLAME_NEXT_LAYER_ACCURACY, FLAME_TOP1_COLLISION)
)
FLAME_MEDIAN_CROSS_LAYER_FOLLOW = float(np.median(FLAME_CROSS_LAYER_FOLLOW))  # 0.166


# ---------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------


def _per_layer(value: Any, count: int, field: str) -> tuple[float, ...]:
    """Broadcast a number to `count` entries, or check that a sequence has `count` entries."""
    if isinstance(value, (int, float, np.integer, np.floating)):
        return (float(value),) * count
    values = tuple(float(x) for x in value)
    if len(values) != count:
        raise ValueError(f"SyntheticConfig.{field}: expected one number or {count} numbers, got {len(values)}")
    return values


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic trace generator.

    Fields that take a number per layer also accept a single number, which applies to every layer; the
    stored value is always a tuple. `cross_layer_follow` has one entry per layer pair l -> l + 1.
    """

    name: str = "custom"
    num_layers: int = 16
    num_experts: int = 64
    top_k: int = 8
    num_sequences: int = 8
    prompt_tokens: int = 128  # tokens of the one prefill pass of each sequence; 0 means no prefill pass
    decode_tokens: int = 512  # decode passes (one token each) of each sequence
    num_passes: int | None = None  # if set, replaces num_sequences: sequences until this many passes, the last cut short
    # Target load max/mean per layer (1 = uniform; must be below num_experts / top_k).
    load_max_mean: tuple[float, ...] | float = 1.0
    # Target load entropy in bits per layer, or None to use a plain Zipf law (offset b = 1).
    load_entropy_bits: tuple[float, ...] | float | None = None
    cross_layer_follow: tuple[float, ...] | float = 0.0  # probability per rank slot, per layer pair
    temporal_reuse: tuple[float, ...] | float = 0.0  # probability per decode token, per layer
    seed: int = 0

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_experts", "top_k", "num_sequences"):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"SyntheticConfig.{field}: expected a positive integer, got {value!r}")
        for field in ("prompt_tokens", "decode_tokens", "seed"):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"SyntheticConfig.{field}: expected an integer >= 0, got {value!r}")
        if self.prompt_tokens + self.decode_tokens < 1:
            raise ValueError("SyntheticConfig: prompt_tokens + decode_tokens must be at least 1 (a sequence needs a token)")
        if self.num_passes is not None and (not isinstance(self.num_passes, (int, np.integer)) or self.num_passes < 1):
            raise ValueError(f"SyntheticConfig.num_passes: expected a positive integer or None, got {self.num_passes!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"SyntheticConfig.top_k: expected at most num_experts={self.num_experts}, got {self.top_k}")
        if self.num_experts > np.iinfo(np.int16).max:
            raise ValueError(f"SyntheticConfig.num_experts: expected at most 32767 (int16 expert ids), got {self.num_experts}")

        L, E, K = self.num_layers, self.num_experts, self.top_k
        max_mean = _per_layer(self.load_max_mean, L, "load_max_mean")
        limit = E / K
        for layer, value in enumerate(max_mean):
            # Every expert is in at most all top-k sets, so max/mean <= E / K, reached only by a fixed set.
            if not (1.0 <= value < limit or (value == 1.0 and K == E)):
                raise ValueError(
                    f"SyntheticConfig.load_max_mean[{layer}]: expected a value in [1, {limit:g}) "
                    f"(num_experts / top_k), got {value}"
                )
        object.__setattr__(self, "load_max_mean", max_mean)

        if self.load_entropy_bits is not None:
            entropy = _per_layer(self.load_entropy_bits, L, "load_entropy_bits")
            for layer, value in enumerate(entropy):
                if not (0.0 < value <= math.log2(E)):
                    raise ValueError(
                        f"SyntheticConfig.load_entropy_bits[{layer}]: expected a value in (0, {math.log2(E):.3f}] "
                        f"(log2 of num_experts), got {value}"
                    )
            object.__setattr__(self, "load_entropy_bits", entropy)

        for field, count in (("cross_layer_follow", max(L - 1, 0)), ("temporal_reuse", L)):
            values = _per_layer(getattr(self, field), count, field)
            for index, value in enumerate(values):
                if not 0.0 <= value <= 1.0:
                    raise ValueError(f"SyntheticConfig.{field}[{index}]: expected a probability in [0, 1], got {value}")
            object.__setattr__(self, field, values)

    @property
    def passes_per_sequence(self) -> int:
        return (1 if self.prompt_tokens > 0 else 0) + self.decode_tokens


PRESETS: dict[str, SyntheticConfig] = {
    "olmoe-1b-7b": SyntheticConfig(
        name="olmoe-1b-7b",
        num_layers=16,
        num_experts=64,
        top_k=8,
        load_max_mean=_interpolate_layers(OLMOE_MEASURED_LAYERS, OLMOE_C4_LOAD_MAX_MEAN, 16),
        load_entropy_bits=_interpolate_layers(OLMOE_MEASURED_LAYERS, OLMOE_C4_LOAD_ENTROPY_BITS, 16),
        # NOTE: no per-token OLMoE trace was available, so the next-layer and decode-reuse figures are
        # borrowed: FLAME-MoE (also 64 experts) for cross-layer, Mixtral decode for temporal reuse.
        cross_layer_follow=FLAME_MEDIAN_CROSS_LAYER_FOLLOW,
        temporal_reuse=MIXTRAL_TEMPORAL_REUSE,
    ),
    "mixtral-8x7b": SyntheticConfig(
        name="mixtral-8x7b",
        num_layers=32,
        num_experts=8,
        top_k=2,
        # Fitted to the Instruct model's decode trace; the C4 figures of the base model (MIXTRAL_C4_*)
        # remain reachable through the load_max_mean and load_entropy_bits spec options.
        load_max_mean=MIXTRAL_DECODE_LOAD_MAX_MEAN,
        cross_layer_follow=MIXTRAL_DECODE_CROSS_LAYER_FOLLOW,
        temporal_reuse=MIXTRAL_DECODE_TEMPORAL_REUSE,
    ),
    "qwen3-30b-a3b": SyntheticConfig(
        name="qwen3-30b-a3b",
        num_layers=48,
        num_experts=128,
        top_k=8,
        load_max_mean=QWEN3_LOAD_MAX_MEAN,
        load_entropy_bits=QWEN3_LOAD_ENTROPY_BITS,
        # NOTE: borrowed from FLAME-MoE and Mixtral like olmoe-1b-7b. The mbolt authors report that
        # unconditional adjacent-layer co-activation in Qwen3 is close to shuffled (Jaccard 0.017 vs
        # 0.016), so the true cross-layer signal may be weaker.
        cross_layer_follow=FLAME_MEDIAN_CROSS_LAYER_FOLLOW,
        temporal_reuse=MIXTRAL_TEMPORAL_REUSE,
    ),
    "flame-moe-290m": SyntheticConfig(
        name="flame-moe-290m",
        num_layers=8,
        num_experts=64,
        top_k=6,
        load_max_mean=FLAME_LOAD_MAX_MEAN,
        load_entropy_bits=FLAME_LOAD_ENTROPY_BITS,
        cross_layer_follow=FLAME_CROSS_LAYER_FOLLOW,
        temporal_reuse=FLAME_TEMPORAL_REUSE,
    ),
}


# ---------------------------------------------------------------------------------------------------
# Spec strings
# ---------------------------------------------------------------------------------------------------

# Option name in a spec -> SyntheticConfig field.
SPEC_OPTIONS = {
    "seed": "seed",
    "passes": "num_passes",
    "sequences": "num_sequences",
    "prompt": "prompt_tokens",
    "decode": "decode_tokens",
    "load_max_mean": "load_max_mean",
    "load_entropy_bits": "load_entropy_bits",
    "cross_layer_follow": "cross_layer_follow",
    "temporal_reuse": "temporal_reuse",
}
_INTEGER_FIELDS = {"seed", "num_passes", "num_sequences", "prompt_tokens", "decode_tokens"}


def is_synthetic_spec(spec: str) -> bool:
    """Tell whether `spec` names a synthetic trace ("synthetic" or "synthetic:PRESET[?options]")."""
    return spec == SPEC_PREFIX or spec.startswith(SPEC_PREFIX + ":")


def _parse_option_value(spec: str, key: str, field: str, text: str) -> Any:
    try:
        if field in _INTEGER_FIELDS:
            return int(text)
        if "," in text:
            return tuple(float(part) for part in text.split(","))
        return float(text)
    except ValueError:
        kind = "an integer" if field in _INTEGER_FIELDS else "a number or comma-separated numbers"
        raise TraceError(f"synthetic spec {spec!r}: option {key!r} expected {kind}, got {text!r}") from None


def parse_synthetic_spec(spec: str) -> SyntheticConfig:
    """Parse "synthetic:PRESET?key=value&..." into a config; "synthetic" alone means the default preset.

    Options (see `SPEC_OPTIONS`): seed, passes (total forward passes), sequences, prompt (prompt tokens
    per sequence), decode (decode tokens per sequence), load_max_mean, load_entropy_bits,
    cross_layer_follow and temporal_reuse. The last four take one number or comma-separated numbers per
    layer (per layer pair for cross_layer_follow). Raises `TraceError` (a ValueError) on an unknown
    preset or option, or an invalid value.
    """
    if not is_synthetic_spec(spec):
        raise TraceError(f"synthetic spec {spec!r}: expected 'synthetic' or 'synthetic:PRESET[?key=value&...]'")
    body = spec[len(SPEC_PREFIX) + 1 :]
    name, _, query = body.partition("?")
    name = name or DEFAULT_PRESET
    if name not in PRESETS:
        raise TraceError(f"synthetic spec {spec!r}: unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    overrides: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        key, equals, text = item.partition("=")
        if not equals or not text:
            raise TraceError(f"synthetic spec {spec!r}: option {item!r} expected the form key=value")
        if key not in SPEC_OPTIONS:
            raise TraceError(f"synthetic spec {spec!r}: unknown option {key!r}; known options: {', '.join(SPEC_OPTIONS)}")
        field = SPEC_OPTIONS[key]
        overrides[field] = _parse_option_value(spec, key, field, text)
    try:
        return dataclasses.replace(PRESETS[name], **overrides)
    except ValueError as error:
        raise TraceError(f"synthetic spec {spec!r}: {error}") from None


def load_synthetic(spec: str = DEFAULT_SPEC) -> Trace:
    """Generate the synthetic trace that a spec string names (see `parse_synthetic_spec`)."""
    return generate_synthetic(parse_synthetic_spec(spec), spec=spec)


# ---------------------------------------------------------------------------------------------------
# Popularity: fit a Zipf-Mandelbrot law to the load targets
# ---------------------------------------------------------------------------------------------------

# Range of the Zipf-Mandelbrot offset b searched when an entropy target is given. Small b concentrates
# load on the top expert, large b approaches an exponential law; at fixed max/mean the load entropy
# falls as b grows.
_OFFSET_RANGE = (0.01, 1.0e4)


def inclusion_probabilities(weights: np.ndarray, top_k: int) -> np.ndarray:
    """Approximate the probability that each expert is in a Plackett-Luce top-k draw from `weights`.

    Uses pi_e = 1 - exp(-lam * w_e) with lam set so that the pi_e sum to top_k. Against 200,000-token
    Monte Carlo draws of Zipf laws with exponents 0.2-1.3, max/mean is within 1.5 % for 64 or 128
    experts and within 4.5 % for 8 experts with top-2. Works on the last axis, and leading axes hold
    independent laws.
    """
    weights = np.asarray(weights, dtype=np.float64)
    num_experts = weights.shape[-1]
    if top_k >= num_experts:
        return np.ones_like(weights)
    weights = weights / weights.max(axis=-1, keepdims=True)
    lam = np.zeros(weights.shape[:-1] + (1,))
    # f(lam) = sum(1 - exp(-lam w)) - k is increasing and concave, so Newton steps from lam = 0 rise
    # monotonically to the root.
    for _ in range(200):
        decay = np.exp(-lam * weights)
        excess = (1.0 - decay).sum(axis=-1, keepdims=True) - top_k
        if np.all(np.abs(excess) < 1e-10 * top_k):
            break
        lam = lam - excess / (weights * decay).sum(axis=-1, keepdims=True)
    return 1.0 - np.exp(-lam * weights)


def load_summary(inclusion: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (max/mean, entropy in bits) of the load distribution given by inclusion probabilities."""
    num_experts = inclusion.shape[-1]
    share = inclusion / top_k
    max_mean = inclusion.max(axis=-1) * num_experts / top_k
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(share > 0, share * np.log2(share), 0.0)
    return max_mean, -terms.sum(axis=-1)


def _zipf_mandelbrot(exponent: np.ndarray, offset: np.ndarray, num_experts: int) -> np.ndarray:
    """Weights [layers, experts] by rank, w(r) ~ (r + b)^-s, scaled so the top weight is 1."""
    log_rank = np.log(np.arange(num_experts)[None, :] + offset[:, None])
    log_weights = -exponent[:, None] * (log_rank - log_rank[:, :1])
    return np.exp(log_weights)


def _fit_exponent(target_max_mean: np.ndarray, offset: np.ndarray, num_experts: int, top_k: int) -> np.ndarray:
    """Bisect the Zipf exponent s of every layer so that the expected max/mean meets its target."""

    def max_mean_at(exponent: np.ndarray) -> np.ndarray:
        inclusion = inclusion_probabilities(_zipf_mandelbrot(exponent, offset, num_experts), top_k)
        return load_summary(inclusion, top_k)[0]

    low = np.zeros_like(target_max_mean)
    high = np.ones_like(target_max_mean)
    for _ in range(40):
        short = max_mean_at(high) < target_max_mean
        if not short.any():
            break
        high = np.where(short, high * 2.0, high)
    for _ in range(48):
        middle = (low + high) / 2.0
        below = max_mean_at(middle) < target_max_mean
        low = np.where(below, middle, low)
        high = np.where(below, high, middle)
    return (low + high) / 2.0


@functools.lru_cache(maxsize=32)
def fit_popularity(
    num_experts: int, top_k: int, load_max_mean: tuple[float, ...], load_entropy_bits: tuple[float, ...] | None
) -> np.ndarray:
    """Fit per-layer expert weights [layers, experts], sorted by rank (largest first), summing to 1.

    Each layer gets the Zipf-Mandelbrot law whose expected load max/mean (see `inclusion_probabilities`)
    equals its target. With entropy targets, the offset b is bisected as well. When an entropy target
    is out of reach at that max/mean, b stops at an end of _OFFSET_RANGE, which gives the nearest
    reachable entropy. The result is cached and read-only.
    """
    target = np.asarray(load_max_mean, dtype=np.float64)
    if load_entropy_bits is None:
        offset = np.ones_like(target)
    else:
        target_entropy = np.asarray(load_entropy_bits, dtype=np.float64)
        log_low = np.full_like(target, math.log(_OFFSET_RANGE[0]))
        log_high = np.full_like(target, math.log(_OFFSET_RANGE[1]))
        for _ in range(30):
            log_middle = (log_low + log_high) / 2.0
            offset = np.exp(log_middle)
            exponent = _fit_exponent(target, offset, num_experts, top_k)
            inclusion = inclusion_probabilities(_zipf_mandelbrot(exponent, offset, num_experts), top_k)
            entropy = load_summary(inclusion, top_k)[1]
            too_flat = entropy > target_entropy  # a larger offset lowers the entropy
            log_low = np.where(too_flat, log_middle, log_low)
            log_high = np.where(too_flat, log_high, log_middle)
        offset = np.exp((log_low + log_high) / 2.0)
    exponent = _fit_exponent(target, offset, num_experts, top_k)
    weights = _zipf_mandelbrot(exponent, offset, num_experts)
    weights /= weights.sum(axis=-1, keepdims=True)
    weights.setflags(write=False)
    return weights


# ---------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------

# Tokens per block of exponential draws; bounds memory to _CHUNK_TOKENS x num_experts float32 values.
# Part of the random stream layout, so changing it changes the traces generated for a seed.
_CHUNK_TOKENS = 32768


# Upper bound on the estimated memory of one generated trace, so that a spec with a huge pass count
# fails with a message instead of exhausting memory.
MAX_TRACE_BYTES = 8 * 2**30
# Estimated peak bytes per (token, layer, top-k slot): the generated int16 expert ids and the int16
# copy that `make_trace` stores, plus boolean masks of the same shape that `validate_trace` builds.
_BYTES_PER_SLOT = 6


def _count_passes_and_tokens(config: SyntheticConfig) -> tuple[int, int]:
    """Return (passes, tokens) of the layout that `_pass_layout` builds, without building it."""
    per_sequence = config.passes_per_sequence
    tokens_per_sequence = config.prompt_tokens + config.decode_tokens
    if config.num_passes is None:
        return config.num_sequences * per_sequence, config.num_sequences * tokens_per_sequence
    full_sequences, extra_passes = divmod(config.num_passes, per_sequence)
    extra_tokens = 0
    if extra_passes:
        # The cut-short sequence keeps its prefill pass (if any) and some decode passes.
        extra_tokens = config.prompt_tokens + extra_passes - 1 if config.prompt_tokens else extra_passes
    return config.num_passes, full_sequences * tokens_per_sequence + extra_tokens


def estimate_trace_bytes(config: SyntheticConfig) -> int:
    """Estimate the peak memory of generating and validating the trace of `config`, in bytes."""
    _, num_tokens = _count_passes_and_tokens(config)
    return num_tokens * config.num_layers * config.top_k * _BYTES_PER_SLOT


def _check_trace_size(config: SyntheticConfig, spec: str | None) -> None:
    estimate = estimate_trace_bytes(config)
    if estimate <= MAX_TRACE_BYTES:
        return
    num_passes, num_tokens = _count_passes_and_tokens(config)
    name = f"synthetic spec {spec!r}" if spec else f"synthetic config {config.name!r}"
    raise TraceError(
        f"{name}: estimated memory {estimate / 2**30:.1f} GiB ({num_tokens} tokens x {config.num_layers} layers x "
        f"{config.top_k} experts per token x {_BYTES_PER_SLOT} bytes, for {num_passes} passes) exceeds the limit of "
        f"{MAX_TRACE_BYTES / 2**30:g} GiB. Request fewer passes, sequences or tokens per sequence."
    )


@dataclasses.dataclass(frozen=True)
class _Layout:
    pass_offsets: np.ndarray
    pass_kind: np.ndarray
    pass_sequence: np.ndarray
    reuse_allowed: np.ndarray  # bool [N]: a decode token with an earlier token in its sequence


def _pass_layout(config: SyntheticConfig) -> _Layout:
    per_sequence = config.passes_per_sequence
    if config.num_passes is None:
        num_sequences = config.num_sequences
        num_passes = num_sequences * per_sequence
    else:
        num_passes = config.num_passes
        num_sequences = -(-num_passes // per_sequence)
    lengths_one = [config.prompt_tokens] * (config.prompt_tokens > 0) + [1] * config.decode_tokens
    kinds_one = [PASS_PREFILL] * (config.prompt_tokens > 0) + [PASS_DECODE] * config.decode_tokens
    lengths = np.tile(np.asarray(lengths_one, dtype=np.int64), num_sequences)[:num_passes]
    pass_kind = np.tile(np.asarray(kinds_one, dtype=np.int8), num_sequences)[:num_passes]
    pass_sequence = np.repeat(np.arange(num_sequences, dtype=np.int32), per_sequence)[:num_passes]

    pass_offsets = np.concatenate([[0], np.cumsum(lengths)])
    token_pass = np.repeat(np.arange(num_passes), lengths)
    token_sequence = pass_sequence[token_pass]
    has_previous = np.zeros(token_pass.shape[0], dtype=bool)
    has_previous[1:] = token_sequence[1:] == token_sequence[:-1]
    reuse_allowed = has_previous & (pass_kind[token_pass] == PASS_DECODE)
    return _Layout(pass_offsets, pass_kind, pass_sequence, reuse_allowed)


def _draw_layer(
    rng: np.random.Generator,
    weights_by_expert: np.ndarray,
    top_k: int,
    forced: np.ndarray | None,
    follow: np.ndarray | None,
    num_tokens: int,
) -> np.ndarray:
    """Draw the top-k experts [N, K] of every token at one layer, in rank order.

    `follow` [N, K] marks the rank slots fixed to the experts in `forced` [N, K]. The remaining slots,
    in rank order, get the best experts of an exponential race among all other experts.
    """
    num_experts = weights_by_expert.shape[0]
    # A floor keeps Exp(1) / w finite, so excluded experts (set to inf) always lose the race.
    weights = np.maximum(weights_by_expert, 1e-30).astype(np.float32)
    fresh = np.empty((num_tokens, top_k), dtype=np.int64)
    for start in range(0, num_tokens, _CHUNK_TOKENS):
        stop = min(start + _CHUNK_TOKENS, num_tokens)
        arrival = rng.standard_exponential((stop - start, num_experts), dtype=np.float32) / weights
        if follow is not None:
            rows, slots = np.nonzero(follow[start:stop])
            arrival[rows, forced[start:stop][rows, slots]] = np.inf
        if top_k < num_experts:
            candidates = np.argpartition(arrival, top_k - 1, axis=1)[:, :top_k]
        else:
            candidates = np.broadcast_to(np.arange(num_experts), arrival.shape).copy()
        order = np.argsort(np.take_along_axis(arrival, candidates, axis=1), axis=1, kind="stable")
        fresh[start:stop] = np.take_along_axis(candidates, order, axis=1)
    if follow is None:
        return fresh

    # Place the j-th best fresh expert into the j-th slot that does not follow; followed slots keep
    # their forced expert. `slot_order` lists the free slots first, in ascending slot order.
    slot_order = np.argsort(follow, axis=1, kind="stable")
    num_free = top_k - follow.sum(axis=1, keepdims=True)
    position = np.arange(top_k)[None, :]
    values = np.where(position < num_free, fresh, np.take_along_axis(forced, slot_order, axis=1))
    result = np.empty_like(fresh)
    np.put_along_axis(result, slot_order, values, axis=1)
    return result


def generate_synthetic(config: SyntheticConfig, spec: str | None = None) -> Trace:
    """Generate a synthetic trace (see the module docstring for the model); `spec` is recorded in notes.

    Raises `TraceError` when `estimate_trace_bytes` exceeds `MAX_TRACE_BYTES`.
    """
    L, E, K = config.num_layers, config.num_experts, config.top_k
    _check_trace_size(config, spec)
    layout = _pass_layout(config)
    num_tokens = int(layout.pass_offsets[-1])
    rng = np.random.default_rng(config.seed)

    weights_by_rank = fit_popularity(E, K, config.load_max_mean, config.load_entropy_bits)
    rank_to_expert = np.stack([rng.permutation(E) for _ in range(L)])
    expert_to_rank = np.argsort(rank_to_expert, axis=1)
    token_index = np.arange(num_tokens)

    expert_ids = np.empty((num_tokens, L, K), dtype=np.int16)
    for layer in range(L):
        forced = follow = None
        probability = config.cross_layer_follow[layer - 1] if layer > 0 else 0.0
        if probability > 0.0:
            follow = rng.random((num_tokens, K)) < probability
            # The transition maps the expert of popularity rank r at layer - 1 to rank r at this layer.
            previous_rank = expert_to_rank[layer - 1][expert_ids[:, layer - 1, :]]
            forced = rank_to_expert[layer][previous_rank]
        weights_by_expert = weights_by_rank[layer][expert_to_rank[layer]]
        chosen = _draw_layer(rng, weights_by_expert, K, forced, follow, num_tokens)

        reuse_probability = config.temporal_reuse[layer]
        if reuse_probability > 0.0:
            reuse = layout.reuse_allowed & (rng.random(num_tokens) < reuse_probability)
            # A reusing token copies the latest non-reusing token; reuse never crosses a sequence start.
            source = np.maximum.accumulate(np.where(reuse, 0, token_index))
            chosen = chosen[source]
        expert_ids[:, layer, :] = chosen

    metadata = TraceMetadata(
        model=f"{SPEC_PREFIX}:{config.name}",
        num_layers=L,
        num_experts=E,
        top_k=K,
        source=f"synthetic generator, seed {config.seed}",
        synthetic=True,
        notes=_describe_config(config, spec),
    )
    return make_trace(
        expert_ids,
        metadata,
        pass_offsets=layout.pass_offsets,
        pass_kind=layout.pass_kind,
        pass_sequence=layout.pass_sequence,
        origin=metadata.model,
    )


def _describe_config(config: SyntheticConfig, spec: str | None) -> str:
    fields = dataclasses.asdict(config)
    text = "synthetic routing (not measured); config " + ", ".join(f"{key}={value}" for key, value in fields.items())
    return f"spec {spec}; {text}" if spec else text

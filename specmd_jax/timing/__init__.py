"""Timing model: layer compute and expert transfers turned into TTFT, TPOT and stall time.

`estimate_timing` takes a trace, the simulator's per-step events for one cache configuration, a
`Hardware` and a `ModelShape` preset, and returns a `TimingResult`. Events of a prefetcher give the
prefetch plan (`prefetch_plan_from_events`), and `miss="host"` computes misses on the host CPU.
"""

from specmd_jax.timing.estimate import LatencySummary, TimingResult, estimate_timing
from specmd_jax.timing.events import prefetch_plan_from_events
from specmd_jax.timing.hardware import PRESETS as HARDWARE_PRESETS
from specmd_jax.timing.hardware import Hardware, get_hardware
from specmd_jax.timing.models import PRESETS as MODEL_PRESETS
from specmd_jax.timing.models import ModelShape, get_model_shape
from specmd_jax.timing.timeline import NO_CONSUMER, Timeline, simulate_timeline

__all__ = [
    "HARDWARE_PRESETS",
    "MODEL_PRESETS",
    "NO_CONSUMER",
    "Hardware",
    "LatencySummary",
    "ModelShape",
    "Timeline",
    "TimingResult",
    "estimate_timing",
    "get_hardware",
    "get_model_shape",
    "prefetch_plan_from_events",
    "simulate_timeline",
]

"""`select_smallest`: the sorted path (many victims) and the round-by-round path choose the same items."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from specmd_jax.policies.base import SORT_ABOVE_VICTIMS, select_smallest


def expected_choice(eligible, num_victims, primary, secondary):
    """The num_victims eligible positions that sort first by (primary, secondary, position)."""
    positions = np.arange(eligible.size)
    ranked = sorted(positions[eligible], key=lambda i: (primary[i], 0 if secondary is None else secondary[i], i))
    chosen = np.zeros(eligible.size, bool)
    chosen[ranked[:num_victims]] = True
    return chosen


@pytest.mark.parametrize("max_victims", [SORT_ABOVE_VICTIMS, SORT_ABOVE_VICTIMS + 1, 40])
@pytest.mark.parametrize("with_secondary", [False, True])
def test_select_smallest_paths_agree(max_victims, with_secondary):
    rng = np.random.default_rng(max_victims * 2 + with_secondary)
    for _ in range(30):
        size = int(rng.choice([5, 64]))
        eligible = rng.random(size) < 0.7
        # Few distinct keys, so ties are common; INT32 max also appears on eligible items.
        primary = rng.choice(np.array([0, 1, 2, np.iinfo(np.int32).max], np.int32), size)
        secondary = rng.integers(0, 3, size).astype(np.int32) if with_secondary else None
        num_victims = int(rng.integers(0, min(max_victims, int(eligible.sum())) + 1))
        got = select_smallest(
            jnp.asarray(eligible), jnp.int32(num_victims), max_victims, jnp.asarray(primary),
            None if secondary is None else jnp.asarray(secondary),
        )
        np.testing.assert_array_equal(np.asarray(got), expected_choice(eligible, num_victims, primary, secondary))

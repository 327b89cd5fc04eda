"""Expert weights in host memory and the fixed-size device cache of expert slots.

Items are (MoE layer, expert) pairs with flat id `layer * E + expert`, as in the simulator. Shapes: L MoE
layers, E experts per layer, S cache slots, H hidden size, I expert intermediate size.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from specmd_jax.model.transformer import MoeTransformer

EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")
"""The weight kinds of one routed expert, in the order every tuple of slot arrays uses."""


def is_expert_weight(path: tuple, value) -> bool:
    """Select the stacked routed-expert weights of an MoE block in `nnx.split` filters."""
    del value
    return len(path) >= 2 and path[-2] == "mlp" and path[-1] in EXPERT_WEIGHTS


@dataclasses.dataclass(frozen=True, eq=False)
class HostExperts:
    """Read-only numpy copies of every routed expert's weights.

    Attributes:
      weights: one array per kind in `EXPERT_WEIGHTS`, [L, E, H, I] for gate and up, [L, E, I, H] for
        down. Each is marked read-only: `jax.device_put` on CPU may alias a host buffer instead of
        copying it, so nothing may ever write into these arrays.
    """

    weights: tuple[np.ndarray, ...]

    def __post_init__(self):
        if len(self.weights) != len(EXPERT_WEIGHTS):
            raise ValueError(f"HostExperts.weights: expected {len(EXPERT_WEIGHTS)} arrays {EXPERT_WEIGHTS}, got {len(self.weights)}")
        shapes = {array.shape[:2] for array in self.weights}
        if len(shapes) != 1 or any(array.ndim != 4 for array in self.weights):
            raise ValueError(f"HostExperts.weights: expected [L, E, rows, cols] arrays with equal L and E, got shapes {[a.shape for a in self.weights]}")
        for array in self.weights:
            if array.flags.writeable:
                raise ValueError("HostExperts.weights: expected read-only arrays (call setflags(write=False) on a private copy)")

    @classmethod
    def from_model(cls, model: MoeTransformer) -> HostExperts:
        """Copy the routed experts of every MoE layer of `model` into new read-only host arrays."""
        stacked = []
        for kind in EXPERT_WEIGHTS:
            array = np.stack([np.asarray(getattr(block, kind)[...]) for block in model.moe_blocks()])
            array.setflags(write=False)
            stacked.append(array)
        return cls(tuple(stacked))

    @property
    def num_layers(self) -> int:
        return self.weights[0].shape[0]

    @property
    def num_experts(self) -> int:
        return self.weights[0].shape[1]

    @property
    def num_items(self) -> int:
        return self.num_layers * self.num_experts

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert, all weight kinds together: the size of one transfer."""
        return sum(array[0, 0].nbytes for array in self.weights)

    def expert(self, flat_id: int) -> tuple[np.ndarray, ...]:
        """Return read-only views of the weights of item `flat_id`, one per kind."""
        if not 0 <= flat_id < self.num_items:
            raise ValueError(f"flat id {flat_id}: expected an item in [0, {self.num_items})")
        layer, expert = divmod(int(flat_id), self.num_experts)
        return tuple(array[layer, expert] for array in self.weights)


@functools.partial(jax.jit, donate_argnums=0)
def _write_slot(slots: tuple[jax.Array, ...], slot: jax.Array, values: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    # Donating the slot arrays lets XLA update them in place where the backend supports donation.
    return tuple(array.at[slot].set(value) for array, value in zip(slots, values))


class SlotCache:
    """S preallocated device slots per weight kind and the table from items to slots.

    The table is host state: `slot_of[flat_id]` is the slot of a resident item or -1, and `item_of[slot]`
    the reverse. A slot's device contents change only through `write`, so an item can own a slot before
    its weights arrive (a transfer in flight).
    """

    def __init__(self, host: HostExperts, num_slots: int, device: jax.Device):
        if isinstance(num_slots, bool) or not isinstance(num_slots, (int, np.integer)) or not 1 <= num_slots <= host.num_items:
            raise ValueError(f"num_slots: expected an integer in [1, {host.num_items}] (the L x E items), got {num_slots!r}")
        self.num_slots = int(num_slots)
        self.num_experts = host.num_experts
        self.device = device
        self.slots = tuple(
            jax.device_put(jnp.zeros((self.num_slots, *array.shape[2:]), array.dtype), device) for array in host.weights
        )
        self.slot_of = np.full(host.num_items, -1, np.int32)
        self.item_of = np.full(self.num_slots, -1, np.int32)

    @property
    def occupancy(self) -> int:
        return int(np.count_nonzero(self.item_of >= 0))

    def resident_items(self) -> np.ndarray:
        """Flat ids of the items that own a slot, ascending."""
        return np.flatnonzero(self.slot_of >= 0)

    def assign(self, flat_id: int) -> int:
        """Give item `flat_id` the free slot with the smallest index and return it."""
        if self.slot_of[flat_id] >= 0:
            raise RuntimeError(f"item {flat_id} already owns slot {self.slot_of[flat_id]}")
        free = np.flatnonzero(self.item_of < 0)
        if free.size == 0:
            raise RuntimeError(f"no free slot for item {flat_id}: all {self.num_slots} slots are taken")
        slot = int(free[0])
        self.slot_of[flat_id] = slot
        self.item_of[slot] = flat_id
        return slot

    def release(self, flat_id: int) -> int:
        """Free the slot of item `flat_id` and return it."""
        slot = int(self.slot_of[flat_id])
        if slot < 0:
            raise RuntimeError(f"item {flat_id} owns no slot, so it cannot be evicted")
        self.slot_of[flat_id] = -1
        self.item_of[slot] = -1
        return slot

    def write(self, slot: int, values: tuple[jax.Array, ...]) -> None:
        """Copy one expert's weights (device arrays, one per kind) into `slot`."""
        self.slots = _write_slot(self.slots, np.int32(slot), values)

    def table_row(self, layer: int) -> np.ndarray:
        """int32 [E]: the slot of each expert of MoE layer `layer`, -1 when not resident."""
        return self.slot_of[layer * self.num_experts:(layer + 1) * self.num_experts].copy()

"""LoRALinearMethod: a linear layer's own method, plus the adapters of the step's rows, in one batch.

    y = base(x);  for each adapter slot s in the step:  y[rows_s] += (x[rows_s] @ A_s^T) @ B_s^T

`rows_s` are the flat-batch rows (tokens) of the requests running the adapter in slot s; rows without an
adapter get base(x) alone. One pair of small matmuls per adapter present in the step (at most `max_loras`),
never a forward pass per adapter. Which rows run which slot is set once per step by the model runner
(`lora_context`), as attention metadata is (`fovea.layers.attention.forward_context`), so model code is
unchanged.

Weights: `layer.lora_a` [num_slots, S * max_rank, in] and `layer.lora_b` [num_slots, out, S * max_rank] for a
layer of S shards (1, or 3 for qkv_proj, 2 for gate_up_proj), zero where a slot's adapter has nothing. Rank
row j of shard i sits at j * S + i, so an adapter of rank r uses the first r * S rows only (no work on the
padding up to max_rank), and shard i's B fills only that shard's output rows: an adapter on q_proj changes
the q rows of qkv_proj and nothing else. B holds the adapter's scaling already.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fovea.layers.linear_methods import (AMXLinearMethod, BF16LinearMethod, BF16RowsLinearMethod, DenseLinearMethod,
                                         LinearMethod, OneDNNLinearMethod)
from fovea.lora.adapter import LoRALayerWeights

# the methods an adapter may wrap: their apply returns a fresh dense [N, out] tensor in the activation dtype
LORA_BASE_METHODS = (DenseLinearMethod, OneDNNLinearMethod, AMXLinearMethod, BF16LinearMethod, BF16RowsLinearMethod)


@dataclass(slots=True)
class LoRAMapping:
    """The step's rows per adapter slot: (slot, rows), rows a slice when contiguous, else a long tensor."""

    segments: list[tuple[int, slice | torch.Tensor]]


_CONTEXT: list[LoRAMapping | None] = []


@contextlib.contextmanager
def lora_context(mapping: LoRAMapping | None) -> Iterator[None]:
    _CONTEXT.append(mapping)
    try:
        yield
    finally:
        _CONTEXT.pop()


def get_lora_mapping() -> LoRAMapping | None:
    """The innermost step's mapping; None outside any (or a step without adapters): base layers only."""
    return _CONTEXT[-1] if _CONTEXT else None


class LoRALinearMethod(LinearMethod):
    """Wraps the method a loaded layer runs (dense, oneDNN, AMX or AVX-512 BF16, packed or in place) and adds the
    step's adapters to its output."""

    def __init__(self, base: LinearMethod, num_slots: int, max_rank: int):
        if not isinstance(base, LORA_BASE_METHODS):
            raise ValueError(f"LoRA adapters run over dense, oneDNN, AMX or AVX-512 BF16 (packed or in place) "
                             f"linear layers; this layer runs {base.name!r} (LoRA with quantized weights is not "
                             f"supported yet)")
        self.base = base
        self.num_slots, self.max_rank = num_slots, max_rank
        self.name = f"lora({base.name})"
        self.shards: dict[str | None, tuple[int, int]] = {}  # shard -> (output offset, size)
        self.slot_ranks = [0] * num_slots

    def create_lora_weights(self, layer: nn.Module, dtype: torch.dtype) -> None:
        sizes = getattr(layer, "shard_sizes", None) or {None: layer.out_features}
        offset = 0
        for shard, size in sizes.items():
            self.shards[shard] = (offset, size)
            offset += size
        width = len(self.shards) * self.max_rank
        # buffers, not parameters: the layer's state_dict stays the base checkpoint's
        layer.register_buffer("lora_a", torch.zeros(self.num_slots, width, layer.in_features, dtype=dtype),
                              persistent=False)
        layer.register_buffer("lora_b", torch.zeros(self.num_slots, layer.out_features, width, dtype=dtype),
                              persistent=False)

    def set_slot(self, layer: nn.Module, slot: int, weights: dict[str | None, LoRALayerWeights] | None) -> None:
        """Put one adapter's weights for this layer in `slot` (None or no entry: the adapter leaves it alone)."""
        num_shards = len(self.shards)
        layer.lora_a[slot].zero_()
        layer.lora_b[slot].zero_()
        rank = 0
        for shard, w in (weights or {}).items():
            index = list(self.shards).index(shard)
            offset, size = self.shards[shard]
            r = w.a.shape[0]
            layer.lora_a[slot, index::num_shards][:r].copy_(w.a)
            layer.lora_b[slot, offset:offset + size, index::num_shards][:, :r].copy_(w.b)
            rank = max(rank, r)
        self.slot_ranks[slot] = rank

    def process_weights_after_loading(self, layer: nn.Module, keep_weight: bool = False) -> None:
        self.base.process_weights_after_loading(layer, keep_weight)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        y = self.base.apply(layer, x)
        mapping = get_lora_mapping()
        if mapping is None:
            return y
        num_shards = len(self.shards)
        for slot, rows in mapping.segments:
            width = self.slot_ranks[slot] * num_shards
            if width == 0:
                continue  # the adapter does not touch this layer
            a = layer.lora_a[slot, :width]  # (r*S, in)
            b = layer.lora_b[slot, :, :width]  # (out, r*S)
            delta = (x[rows] @ a.T) @ b.T  # (rows, out)
            if isinstance(rows, slice):
                y[rows] += delta
            else:
                y.index_add_(0, rows, delta)
        return y

    def checkpoint_tensors(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        return self.base.checkpoint_tensors(layer)

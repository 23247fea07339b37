"""LoRA under tensor parallelism: each rank keeps the part of an adapter that its slice of the base layer needs
(the split vLLM's column- and row-parallel LoRA layers make; Megatron-LM's split applied to A and B).

    column-parallel (qkv_proj, gate_up_proj, OPT's fc1: output rows split)   A whole [r, in], B's rows of the rank
        y_rank += (x @ A^T) @ B_rank^T
        every rank computes the same shrink x @ A^T (r columns: cheap) and its own output rows; no communication
    row-parallel (o_proj, down_proj, OPT's out_proj and fc2: input columns split)   A's columns of the rank, B whole
        y_partial_rank += (x_rank @ A_rank^T) @ B^T
        summed over the ranks by the layer's own all-reduce: sum_r (x_r A_r^T) B^T = (x A^T) B^T, so no collective
        is added, and the adapter's delta is summed with the base partial products in one all-reduce

A packed column-parallel layer cuts each shard's B as it cuts that shard's weight: q by the rank's query heads, k and
v by its KV heads (the one KV head its query heads read when KV heads are replicated), gate and up each in halves.
An adapter is checked against the checkpoint's (unsplit) shapes, then cut once when it is read (the CPU cache holds
only the rank's part). At TP = 1 every slice is the whole tensor.
"""
from __future__ import annotations

from torch import nn

from fovea.layers.linear import PackedLinear
from fovea.layers.parallel_linear import ColumnParallelLinear, ColumnParallelPackedLinear, RowParallelLinear
from fovea.lora.adapter import LoRAAdapter, LoRALayerWeights

Shapes = dict[str | None, tuple[int, int]]  # shard (None: the whole layer) -> (in_features, out_features)


def checkpoint_shapes(layer: nn.Module) -> Shapes:
    """The (in, out) of each shard of `layer` as the base checkpoint has it, before any tensor-parallel split: what
    a PEFT adapter's A [r, in] and B [out, r] are made for."""
    if isinstance(layer, ColumnParallelPackedLinear):
        return {shard: (layer.in_features, rows) for shard, rows in layer.checkpoint_sizes.items()}
    if isinstance(layer, PackedLinear):
        return {shard: (layer.in_features, rows) for shard, rows in layer.shard_sizes.items()}
    if isinstance(layer, ColumnParallelLinear):
        return {None: (layer.in_features, layer.full_out_features)}
    if isinstance(layer, RowParallelLinear):
        return {None: (layer.full_in_features, layer.out_features)}
    return {None: (layer.in_features, layer.out_features)}


def rank_part(layer: nn.Module, shard: str | None, weights: LoRALayerWeights) -> LoRALayerWeights:
    """The part of one layer's (one shard's) adapter weights that this rank's slice of `layer` runs (a copy)."""
    a, b = weights.a, weights.b
    if isinstance(layer, ColumnParallelPackedLinear):
        first, rows = layer.rank_slices[shard]
        b = b.narrow(0, first, rows)
    elif isinstance(layer, ColumnParallelLinear):
        b = b.narrow(0, layer.tp_rank * layer.out_features, layer.out_features)
    elif isinstance(layer, RowParallelLinear):
        a = a.narrow(1, layer.tp_rank * layer.in_features, layer.in_features)
    return LoRALayerWeights(a=a.contiguous(), b=b.contiguous())


def keep_rank_part(adapter: LoRAAdapter, layers: dict[str, nn.Module]) -> LoRAAdapter:
    """`adapter` with every layer's weights cut to this rank's part (`rank_part`), in place."""
    adapter.weights = {name: {shard: rank_part(layers[name], shard, w) for shard, w in shards.items()}
                       for name, shards in adapter.weights.items()}
    return adapter

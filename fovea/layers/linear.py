"""Linear layers whose checkpoint tensors are not one-to-one with their parameters.

A parameter may carry `weight_loader(param, loaded, shard_id)` and `packed_shards` (the shard ids that
together fill it); `fovea.models.weights.load_weights` calls the loader for every checkpoint tensor mapped to
the parameter, and counts it filled once it got the whole tensor (`shard_id=None`) or every packed shard.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

WeightLoader = Callable[[nn.Parameter, torch.Tensor, "str | None"], None]


def copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) (converting dtype) after checking the shapes match exactly."""
    if dst.shape != src.shape:
        raise ValueError(f"shape {tuple(src.shape)} vs expected {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src)


def set_weight_loader(param: nn.Parameter, loader: WeightLoader, packed_shards: tuple[str, ...]) -> None:
    param.weight_loader = loader
    param.packed_shards = packed_shards


class PackedLinear(nn.Linear):
    """Projections of the same input stacked into one matmul, e.g. q, k, v -> qkv_proj.

    `shard_sizes` names the checkpoint's separate projections in output order with their output sizes;
    forward returns the stacked output [..., sum(sizes)], `split` cuts it back into one view per shard.
    """

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = True):
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shard_sizes = dict(shard_sizes)
        self.shard_offsets: dict[str, int] = {}
        offset = 0
        for name, size in self.shard_sizes.items():
            self.shard_offsets[name] = offset
            offset += size
        for param in self.parameters():
            set_weight_loader(param, self._load_shard, tuple(self.shard_sizes))

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None) -> None:
        if shard_id is None:
            copy_checked(param.data, loaded)
            return
        if shard_id not in self.shard_sizes:
            raise ValueError(f"no shard {shard_id!r} in a layer packing {list(self.shard_sizes)}")
        dst = param.data.narrow(0, self.shard_offsets[shard_id], self.shard_sizes[shard_id])
        copy_checked(dst, loaded)

    def split(self, stacked: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return stacked.split(list(self.shard_sizes.values()), dim=-1)

"""Linear layers whose checkpoint tensors are not one-to-one with their parameters, and the CPU fast path.

A parameter may carry `weight_loader(param, loaded, shard_id)` and `packed_shards` (the shard ids that
together fill it); `fovea.models.weights.load_weights` calls the loader for every checkpoint tensor mapped to
the parameter, and counts it filled once it got the whole tensor (`shard_id=None`) or every packed shard.

`prepack_linear_weights` moves a loaded model's linear weights into a packed layout for inference: fovea's own AMX
kernel's (`fovea.layers.amx_linear`) for bfloat16 where it applies, oneDNN's blocked layout otherwise.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from types import MethodType

import torch
from torch import nn

from fovea.layers import amx_linear

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


# ---- CPU inference: oneDNN-packed weights ----------------------------------------------------------------------

PREPACK_BATCH_HINT = 64
"""Rows oneDNN tunes the packed layout for; measured fast from 1 to several thousand rows either way."""


def onednn_linear_available() -> bool:
    """oneDNN's packed linear can run here, and FOVEA_NO_ONEDNN_LINEAR=1 does not turn it off."""
    return os.environ.get("FOVEA_NO_ONEDNN_LINEAR") != "1" and torch.backends.mkldnn.is_available()


BF16_SLOW_ROWS = range(17, 33)
"""bfloat16 inputs with this many rows are padded with zero rows to `BF16_SLOW_ROWS.stop`: oneDNN (3.12, AMX,
2 threads) runs them ~1.5x slower than 16 or 33 rows (Qwen2-0.5B's 896 x 9728 gate/up weight: 2.4 ms at 32 rows,
1.6 ms at 33, weights cold in memory), and decode batches sit right there. float32 has no such step."""


def _onednn_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.shape[0]
    if x.dim() == 2 and rows in BF16_SLOW_ROWS and x.dtype == torch.bfloat16:
        padded = x.new_zeros(BF16_SLOW_ROWS.stop, x.shape[1])
        padded[:rows] = x
        return torch.ops.mkldnn._linear_pointwise(padded, self.onednn_weight, self.bias, "none", [], "")[:rows]
    return torch.ops.mkldnn._linear_pointwise(x, self.onednn_weight, self.bias, "none", [], "")


def _amx_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return amx_linear.linear(x, self.amx_weight, self.amx_bias)


def prepack_linear_weights(model: nn.Module, batch_hint: int = PREPACK_BATCH_HINT) -> int:
    """Repack the weight of every CPU float32/bfloat16 `nn.Linear` of `model` (inference only: no autograd)
    into oneDNN's blocked layout, and run those layers through oneDNN from then on. Returns how many.
    bfloat16 layers that `amx_linear.supports` (AMX here, K and N multiples of 32) go to that kernel instead
    (faster here, see its docstring; FOVEA_NO_AMX_LINEAR=1 keeps them on oneDNN).

    Why: on this class of machine, torch's default CPU matmul (MKL) reaches ~150 GFLOP/s in float32 where
    oneDNN's packed kernels reach ~400 (and bfloat16 gains 1.1-1.7x), with the same float32 arithmetic in a
    different summation order. The dense weight is released (a packed copy replaces it); `module.weight`
    becomes an empty placeholder of the same dtype, so code that asks a layer for its dtype still works while
    code that would read its values fails loudly. A weight shared with another module (a tied `lm_head`)
    stays with that module. FOVEA_NO_ONEDNN_LINEAR=1 turns the whole path off.
    """
    if not onednn_linear_available():
        return 0
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (not isinstance(module, nn.Linear) or not isinstance(weight, torch.Tensor) or weight.dim() != 2
                or weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16)
                or weight.numel() == 0):
            continue
        bias = module.bias
        if bias is not None and bias.dtype != weight.dtype:
            continue
        if amx_linear.supports(weight):
            module.amx_weight = amx_linear.pack_weight(weight)
            module.amx_bias = None if bias is None else bias.detach().float()
            module.forward = MethodType(_amx_forward, module)
        else:
            module.onednn_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)
            module.forward = MethodType(_onednn_forward, module)
        module.weight = nn.Parameter(torch.empty(0, dtype=weight.dtype), requires_grad=False)
        count += 1
    return count

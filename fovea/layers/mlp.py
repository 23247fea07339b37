"""Feed-forward blocks shared by model families.

`MLP` is the two-layer fc1 -> act -> fc2 block of the ViTs (BLIP's and CLIP's vision towers).

`GatedMLP` is the gate/up/down MLP of Llama-style decoders (Qwen2's language model) and of Qwen2.5-VL's vision
blocks: down(act(gate(x)) * up(x)), with gate and up packed into one matmul (`gate_up_proj`, loaded from the
checkpoint's separate `gate_proj` / `up_proj` through the model's `packed_modules_mapping`). A language model's
is tensor-parallel (`tensor_parallel=True`: gate/up split by columns, down by rows, one all-reduce); a vision
block's is replicated on every rank.
"""
from __future__ import annotations

import torch
from torch import nn

from fovea import kernels
from fovea.layers.activations import get_activation
from fovea.layers.linear import Linear, PackedLinear
from fovea.layers.parallel_linear import MergedColumnParallelLinear, RowParallelLinear


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) over x [..., hidden_size]; gate and up packed into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool,
                 tensor_parallel: bool = False):
        super().__init__()
        shards = {"gate_proj": intermediate_size, "up_proj": intermediate_size}
        if tensor_parallel:  # this rank's gate and up columns [..., 2 * intermediate / tp], then its rows of down
            self.gate_up_proj = MergedColumnParallelLinear(hidden_size, shards, bias=bias)
            self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias)
        else:
            self.gate_up_proj = PackedLinear(hidden_size, shards, bias=bias)
            self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)
        self.act = get_activation(hidden_act)
        self.is_silu = hidden_act in ("silu", "swish")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # (..., 2 * intermediate / tp)
        if self.is_silu and gate_up.dim() == 2 and kernels.can_fuse(gate_up):
            return self.down_proj(kernels.silu_mul(gate_up))  # one pass instead of two
        gate, up = self.gate_up_proj.split(gate_up)
        return self.down_proj(self.act(gate) * up)


class MLP(nn.Module):
    """fc2(act(fc1(x))) over x [..., hidden_size] (ViT blocks: BLIP's, CLIP's)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool = True):
        super().__init__()
        self.fc1 = Linear(hidden_size, intermediate_size, bias=bias)
        self.fc2 = Linear(intermediate_size, hidden_size, bias=bias)
        self.act = get_activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

"""Normalisation layers shared by the models."""
from __future__ import annotations

import torch
from torch import nn

from fovea import kernels


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back before the weight (as transformers' Qwen2).

    Over rows with contiguous features at inference, one fused CPU kernel (`fovea.kernels.rms_norm`) instead
    of seven ops, with the same roundings.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() == 2 and x.stride(1) == 1 and x.dtype == self.weight.dtype
                and kernels.can_fuse(x, self.weight)):
            return kernels.rms_norm(x, self.weight, self.eps)
        return rms_norm_reference(x, self.weight, self.eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)

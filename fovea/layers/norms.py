"""Normalisation layers shared by the models."""
from __future__ import annotations

import torch
from torch import nn

from fovea import kernels


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back before the weight (as transformers' Qwen2).

    `forward(x, residual)` also does a pre-norm block's residual add first (vLLM's fused add-norm): it returns
    (norm(x + residual), x + residual), the sum rounded to x's dtype as torch's add, and writes the sum into x's
    own buffer when the kernel runs (x is a sublayer's fresh output; `residual` is only read).

    Over rows with contiguous features at inference, one fused CPU kernel (`fovea.kernels.rms_norm`,
    `add_rms_norm_`) instead of seven ops (eight with the add), with the same roundings.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        weight = self.weight  # one lookup: a parameter goes through nn.Module.__getattr__, and decode pays each
        if residual is None:
            if x.dim() == 2 and x.stride(1) == 1 and x.dtype == weight.dtype and kernels.can_fuse(x, weight):
                return kernels.rms_norm(x, weight, self.eps)
            return rms_norm_reference(x, weight, self.eps)
        # the kernel checks the shapes (the same) and names what is wrong
        if x.dim() == 2 and x.stride(1) == 1 and residual.stride(-1) == 1 and x.dtype == weight.dtype \
                and residual.dtype == x.dtype and kernels.can_fuse(x, residual, weight):
            return kernels.add_rms_norm_(x, residual, weight, self.eps), x
        x = x + residual
        return self(x), x


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)

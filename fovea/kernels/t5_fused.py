"""Typed wrappers of T5's fused CPU kernels (`csrc/t5_fused.cpp`), in the spirit of `fovea.kernels.ops`.

A T5 decode step runs its norms and gated feed-forward over a few dozen rows, where torch's per-op cost is most of
the time: transformers' T5LayerNorm is seven ops and Flan-T5's gate three. Each kernel is one pass over the rows
and reproduces the torch formula's roundings op by op (R: rounding to the output's dtype):

- `t5_layer_norm(x, weight, eps)`: y = R(weight * R(x * rsqrt(mean(x^2) + eps))), statistics in float32, the
  output in the weight's dtype (x float32 or bfloat16: T5's residual stream is float32 after the first float32
  `wo`). Only the mean's summation order can differ from torch's.
- `gelu_tanh_mul(a, b)`: R(R(gelu_tanh(a)) * b), gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
  with torch's order of float32 operations (transformers' "gelu_new", which Flan-T5's "gated-gelu" selects); its
  tanh is built on `exp_approx` (csrc/common.h), not Sleef's, so float32 results may differ from torch's in the
  last bits and bfloat16 ones rarely by one step.

Check `fovea.kernels.can_fuse(...)` first; the kernels raise RuntimeError naming a bad argument.
"""
from __future__ import annotations

import torch

from fovea.kernels.ops import extension


def _module():
    module = extension()
    if module is None:
        raise RuntimeError("fovea's C++ kernels do not run here; check fovea.kernels.can_fuse before calling them")
    return module


def t5_layer_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [N, D] (rows contiguous) float32 or bfloat16, weight [D] -> [N, D] in the weight's dtype."""
    return _module().t5_layer_norm(x, weight, eps)


def gelu_tanh_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b [N, I] (rows contiguous, one dtype) -> gelu_tanh(a) * b [N, I]."""
    return _module().gelu_tanh_mul(a, b)

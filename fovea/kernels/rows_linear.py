"""fovea's bfloat16 linear kernel on the checkpoint's own layout: y = x @ W^T + b with W read row-major, as the
safetensors file holds it, float32 accumulation, rounded once.

Why: the panel kernel (`fovea.kernels.bf16_linear`) reads W from its own packed copy, and writing that copy is
most of a model's load on this VM (each GB of fresh memory written costs 2-2.5 CPU-s: the host backs pages on
first touch; BLIP-2 OPT-2.7b loads in 12.1 s against transformers' 2.7 s, which writes nothing: its weights are
views of the mapped file). This kernel runs straight from such views: read-only, 4 KiB page-cache pages, any row
stride (a tensor-parallel column shard), several pieces stacked along N (q/k/v, gate/up passed separately).

Arithmetic (csrc/rows_linear.cpp), the same bits on every path, row count and thread count: for output (m, n),
16 float32 lanes accumulate VDPBF16PS(x[m, 32s:32s+32], W[n, 32s:32s+32]) over s in order (elements past K read
as zeros), the lanes are summed in one fixed tree ((l, l+8), (l, l+4), (l, l+2), (l, l+1)), the bias added in
float32, and the result rounded once to bfloat16 (nearest even). So a row of x gets the same bits whatever other
rows share the call (decode rows beside prefill chunks). The panel kernel sums in another order: the two agree to
rounding, not bit for bit.

Two paths. Up to 8 rows (decode): each thread takes contiguous runs of W rows, cuts each run into 4 streams (2
from 5 rows of x) and reads them side by side, each row after row in address order, every 64-byte load feeding
one VDPBF16PS per row of x (reading adjacent rows interleaved, as a kernel that transposes W on the fly would,
streams at half the rate or less; one stream leaves one dependent chain per output). More rows (prefill, vision
towers): 4 x 6 register tiles (rows of x x rows of W, one accumulator per output) over blocks of W rows that stay
in L2 while every row of x passes them, the next block prefetched in address order meanwhile.

`available()` is True where the CPU reports avx512_bf16, the extension built, and `cpu_kernels` is not "off"
(`fovea.kernels.status().rows_linear` says which and why).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from fovea.kernels.ops import extension
from fovea.kernels.runtime import RUNTIME


def available() -> bool:
    """This kernel runs here (see the module docstring)."""
    return RUNTIME.status().rows_linear.is_active


def supports(weight: torch.Tensor) -> bool:
    """`weight` [N, K] can be read by this kernel as it is: a non-empty CPU bfloat16 matrix with contiguous rows
    (any row stride), and the kernel runs here."""
    return (weight.dim() == 2 and weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and weight.numel() > 0 and weight.stride(-1) == 1 and available())


def linear(x: torch.Tensor, sources: Sequence[torch.Tensor], out_features: int,
           bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] bfloat16 -> [..., out_features] bfloat16.

    `sources`: bfloat16 [n_i, K] pieces of W with stride(1) == 1 and stride(0) >= K (views of a mapped file, row
    or column ranges of a bigger matrix), stacked along N in the given order; sum(n_i) == out_features. `bias`:
    float32 [out_features] or None. Anything else is a RuntimeError naming it.
    """
    if not available():
        raise RuntimeError(f"fovea's row-major AVX-512 BF16 linear kernel does not run here "
                           f"({RUNTIME.status().rows_linear.describe()})")
    if isinstance(sources, torch.Tensor):
        raise TypeError("sources must be a sequence of [n_i, K] tensors, not one tensor: pass [weight]")
    # the models' flat batch [N, K] goes straight in (as bf16_linear: no reshape or view op around the call)
    if x.dim() == 2 and x.stride(1) == 1:
        return extension().rows_linear(x, sources, out_features, bias)
    if x.dim() == 0:
        raise RuntimeError("x must have at least one dimension [..., K]; got a scalar")
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    return extension().rows_linear(flat, sources, out_features, bias).view(*x.shape[:-1], out_features)

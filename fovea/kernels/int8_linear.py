"""fovea's int8 weight-only linear kernel (W8A16) on AVX-512 BF16: y = R(scale * (x @ q^T) + bias).

x bfloat16 [M, K], q int8 [N, K] (per output channel), scale [N]; float32 sums of the exact products
x[m, k] * q[n, k] (an int8 is exact in bfloat16), multiplied by the channel's scale, the bias added, rounded once
to bfloat16. Compared with dequantize-then-GEMM (`F.linear(x, q * scale)`), the weight is never rounded to
bfloat16 after scaling, so the result is as close to the float64 product or closer.

Why: a decode step reads every weight once, so a few rows are bound by the bytes read. torch's int8 weight-only
CPU kernel (`aten._weight_int8pack_mm`) reads int8 well below the memory bandwidth, and more rows than it handles
well fell back to dequantizing the whole weight every step. Here the weight is one stream of 32-column panels
read at close to the bandwidth; each 64-byte step is widened to bfloat16 in registers (`csrc/int8_linear.cpp`)
and multiplied into up to 12 rows of x with `vdpbf16ps`; more rows (prefill, large decode batches) keep the
widened panel in a per-thread buffer (L2) and run the other row blocks from it: a cache-tile GEMM that never
writes the dequantized weight to memory. The threads take panels from a shared counter (`WorkCounter`).

Layout (`pack_weight`, done once at load; the only copy kept): q [N, K] -> [ceil(N/32), ceil(K/2), 32, 2],
element [p, s, n, e] = q[32p + n, 2s + e], zero where past N or K. An odd K gets a zero column; the kernel pads
x to match.

Runs where the CPU has AVX-512 BF16 and BW (AMD Zen 4, Intel Sapphire Rapids and later), the extension built and
`cpu_kernels` is not "off" (`fovea.kernels.status().int8_linear` says which and why).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fovea.kernels.ops import extension
from fovea.kernels.runtime import RUNTIME

PANEL = 32
"""Output columns per panel of the packed layout."""


def available() -> bool:
    """This kernel runs here (see the module docstring)."""
    return RUNTIME.status().int8_linear.is_active


def pack_weight(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] int8 -> [ceil(N/32), ceil(K/2), 32, 2]: element [p, s, n, e] is q[32p + n, 2s + e] (0 past the end)."""
    n, k = q.shape
    padded = F.pad(q.detach(), (0, k % 2, 0, -n % PANEL))
    return padded.view(-1, PANEL, (k + 1) // 2, 2).permute(0, 2, 1, 3).contiguous()


def unpack_weight(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The [N, K] int8 matrix `pack_weight` was given."""
    num_panels, num_pairs = packed.shape[:2]
    q = packed.permute(0, 2, 1, 3).reshape(num_panels * PANEL, num_pairs * 2)
    return q[:out_features, :in_features].contiguous()


def linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, scale: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] bfloat16 -> [..., N] bfloat16; `packed` from `pack_weight`, `scale` and `bias` [N] (any float
    dtype; used as float32)."""
    module = extension()
    if module is None or not available():
        raise RuntimeError(f"fovea's int8 linear kernel does not run here "
                           f"({RUNTIME.status().int8_linear.describe()})")
    flat = x.reshape(-1, x.shape[-1])
    return module.int8_linear(flat, packed, out_features, scale, bias).view(*x.shape[:-1], out_features)

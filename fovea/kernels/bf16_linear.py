"""fovea's bfloat16 linear kernel on AVX-512 BF16: y = x @ W^T + b, float32 accumulation, rounded once.

Why: decode reads every weight once per token, so a step of a few rows is bound by how fast the weights stream
from memory. oneDNN's packed linear reads them at ~30 GB/s at 1 row (27 at 8, 21 at 16) and torch's plain bf16
GEMV at ~15, where the machine reads ~54 (a plain `sum`, AMD EPYC Zen 4, 2 threads); `benchmarks/gemv.py`
measures all of them in one run. This kernel streams each weight panel as one contiguous run of memory, with
every 64-byte load feeding one VDPBF16PS per row of x; at 1-4 rows (decode) the loads are issued in address order
and the hardware prefetcher alone runs ahead of them (out of order, as the compiler had scheduled them, one row
read at under half the rate: csrc/bf16_linear.cpp), at 5-12 rows a software prefetch 16 KB ahead.

Layout: `fovea.kernels.panels`, shared with the AMX kernel so one packed copy serves both on a host that has
AMX: W [N, K] is zero-padded to multiples of 32 and packed into [N/32, K/32, 2, 16, 16, 2] (`pack_weight`): each
32-column panel holds, for every 32-wide step along K, two blocks of 16 columns in which a 64-byte row is the
16 columns' weights for one pair of k (k = 2r, 2r + 1). The kernel broadcasts x's pair (x[m, 2r], x[m, 2r + 1])
as one 32-bit lane against that row: 16 columns x 2 k multiply-added into 16 float32 sums, no horizontal sum.
Rows go in blocks of at most 12 (2 x 12 accumulators of 16 columns; balanced: 13 rows are 7 + 6); each thread
takes the next group of panels from its own contiguous run (`RangeSplit`, csrc/common.h) and runs every row block
over it, so the weights are read from memory once and from L2 for the later row blocks.

Arithmetic: products of bfloat16 pairs summed in float32 (VDPBF16PS; its float32 additions may flush denormal
results to zero), bias added in float32, rounded to nearest even once (VCVTNE2PS2BF16, which also reads float32
denormals as zero). Only the summation order and denormals differ from a float32 matmul of the same bfloat16
inputs. K and N need not be multiples of 32: x is zero-padded to the packed K (so padding meets zeros, never
stray bits) and only the real columns are written.

The code (csrc/bf16_linear.cpp) is compiled into the one extension on every x86-64 host; `available()` is True
where the CPU reports avx512_bf16 (AMD Zen 4 and later, Intel Cooper Lake, Sapphire Rapids and later), the
extension built, and `cpu_kernels` is not "off" (`fovea.kernels.status().bf16_linear` says which and why).
"""
from __future__ import annotations

import torch

from fovea.kernels.ops import extension
from fovea.kernels.panels import BLOCK, pack_weight, unpack_weight  # noqa: F401  (the layout's one home)
from fovea.kernels.runtime import RUNTIME


def available() -> bool:
    """This kernel runs here (see the module docstring)."""
    return RUNTIME.status().bf16_linear.is_active


def supports(weight: torch.Tensor) -> bool:
    """`weight` [N, K] can be packed for this kernel: a non-empty CPU bfloat16 matrix, and the kernel runs here."""
    return (weight.dim() == 2 and weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and weight.numel() > 0 and available())


def linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] bfloat16 -> [..., out_features] bfloat16; `packed` from `pack_weight`, `bias` float32 or None."""
    if not available():
        raise RuntimeError(f"fovea's AVX-512 BF16 linear kernel does not run here "
                           f"({RUNTIME.status().bf16_linear.describe()})")
    # the models' flat batch [N, K] goes straight in: a reshape and a view around the call would each be one more
    # op starting from cold caches after the previous layer's weights streamed through them (fovea/kernels/ops.py)
    if x.dim() == 2 and x.stride(1) == 1:
        return extension().bf16_linear(x, packed, out_features, bias)
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    return extension().bf16_linear(flat, packed, out_features, bias).view(*x.shape[:-1], out_features)

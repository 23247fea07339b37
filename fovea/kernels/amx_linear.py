"""fovea's bfloat16 linear kernel on Intel AMX: y = x @ W^T + b, float32 accumulation, rounded once.

Why not oneDNN's packed linear, which also runs AMX there (measured on a 2-vCPU Sapphire Rapids VM, Qwen2-0.5B's
shapes, weights cold):

- Decode is a stream over the weights. oneDNN reads them at 8-11 GB/s at 32 rows; this kernel at 12-14 GB/s (a
  plain `sum` reads ~14): each 32-column panel is one contiguous run of memory, prefetched 2 KB ahead.
- The two vCPUs share their physical cores with other tenants' hyperthreads, and whichever core has a busy
  neighbour often runs AMX code at a third of the other's speed (same kernel pinned to each: 690 vs 170-290
  GFLOP/s; which core is slow changes from minute to minute). oneDNN splits the columns in two fixed halves and
  waits for the slow half; here each thread takes the next group of panels from a shared counter (`WorkCounter`
  in csrc/common.h) until none is left.
- Prefill outputs that will not stay in cache anyway (more than 256 rows) are written with streaming stores.

Layout (`fovea.kernels.panels`, shared with the AVX-512 BF16 kernel): W [N, K] is packed once into [N/32, K/32, 2,
16, 16, 2] (`pack_weight`): for each 32-column panel and each 32-wide step along K, the two AMX B tiles of 16
columns each, in the pair-interleaved (VNNI) order the tile multiply reads. Rows go 32 at a time (C tiles 2 x 2:
rows 0-15 / 16-31 by columns 0-15 / 16-31; A tiles of 16 rows x 32 k read straight from x); a block of at most 16
rows uses the top half only, and a partial block is first copied into a zero-padded buffer. Bias is added in float32
and the result rounded to nearest even by VCVTNE2PS2BF16, which reads float32 denormals as zero (only results below
1.2e-38 in magnitude differ from torch's rounding). Only the summation order differs from a float32 matmul of the
same bfloat16 inputs.

The code (csrc/amx_linear.cpp) is compiled into the one extension on every x86-64 host; `available()` is True only
where the CPU has AMX-BF16 and Linux grants the tile state (arch_prctl ARCH_REQ_XCOMP_PERM), the extension built,
and `cpu_kernels` is not "off" (`fovea.kernels.status().amx_linear` says which and why).
"""
from __future__ import annotations

import torch

from fovea.kernels import panels
from fovea.kernels.ops import extension
from fovea.kernels.panels import BLOCK  # K and N must be multiples of it here: this kernel reads no padding
from fovea.kernels.runtime import RUNTIME


def available() -> bool:
    """This kernel runs here (see the module docstring)."""
    return RUNTIME.status().amx_linear.is_active


def supports(weight: torch.Tensor) -> bool:
    """`weight` [N, K] can be packed for this kernel: a CPU bfloat16 matrix with K and N multiples of 32, and
    the kernel runs here."""
    return (weight.dim() == 2 and weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and weight.shape[0] % BLOCK == 0 and weight.shape[1] % BLOCK == 0 and weight.numel() > 0
            and available())


def pack_weight(weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """W [N, K] -> [N/32, K/32, 2, 16, 16, 2] (`panels.pack_weight`, unpadded, into `out` if given): element
    [p, s, h, r, n, e] is W[32p + 16h + n, 32s + 2r + e]. N and K must be multiples of 32: `linear` writes every
    packed column."""
    if weight.dim() != 2 or weight.shape[0] % BLOCK or weight.shape[1] % BLOCK:
        raise ValueError(f"the AMX kernel packs a [N, K] weight with N and K multiples of {BLOCK}; "
                         f"got {list(weight.shape)}")
    return panels.pack_weight(weight, out=out)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] bfloat16 -> [..., N] bfloat16; `packed` from `pack_weight`, `bias` float32 [N] or None."""
    if not available():
        raise RuntimeError(f"fovea's AMX linear kernel does not run here ({RUNTIME.status().amx_linear.describe()})")
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    return extension().amx_linear(flat, packed, bias).view(*x.shape[:-1], packed.shape[0] * BLOCK)

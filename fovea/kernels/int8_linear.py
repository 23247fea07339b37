"""fovea's int8 weight-only linear kernel (W8A16) on AVX-512 BF16: y = R(scale * (x @ q^T) + bias).

x bfloat16 [M, K], q int8 [N, K] (per output channel), scale [N]; float32 sums of the exact products
x[m, k] * q[n, k] (an int8 is exact in bfloat16), multiplied by the channel's scale, the bias added, rounded once
to bfloat16. Compared with dequantize-then-GEMM (`F.linear(x, q * scale)`), the weight is never rounded to
bfloat16 after scaling, so the result is as close to the float64 product or closer.

Why: a decode step reads every weight once, so a few rows are bound by the bytes read. torch's int8 weight-only
CPU kernel (`aten._weight_int8pack_mm`) reads int8 well below the memory bandwidth, and more rows than it handles
well fell back to dequantizing the whole weight every step. Here the weight is one stream of 32-column panels
read at close to the bandwidth; each 64-byte step is widened to bfloat16 in registers (`csrc/int8_linear.cpp`)
by two byte-table look-ups (`vpermt2b`) and multiplied into up to 6 rows of x with `vdpbf16ps`; more rows (prefill, large decode batches) keep the
widened panel in a per-thread buffer (L2) and run the other row blocks from it: a cache-tile GEMM that never
writes the dequantized weight to memory. Each thread streams its own contiguous run of panels and takes panels
from the back of the other's when done (`RangeSplit`). How the decode loops read (1 row: loads in address order
and a sparse software prefetch; 2-6 rows: a prefetch per line) and what decided it: the head of the .cpp file.

Layout (`pack_weight`, done once at load; the only copy kept): q [N, K] -> [ceil(N/32), ceil(K/2), 64] uint8
codes. Step s of panel p holds the 64 weights q[32p + n, 2s + e] (n < 32, e < 2; zero where past N or K), each as
a sign-magnitude code (sign << 7 | |q|, and 0x80 for -128, which has no magnitude of 7 bits), in the byte order
`STEP_ORDER`: the kernel looks up each code's bfloat16 low and high bytes in two 128-entry tables and interleaves
them within each 16-byte lane (vpunpck{l,h}bw), which must give columns 0-15 then 16-31 in (n, e) order. Why
codes: widening int8 through int32 and float32 (vpmovsxbd, vcvtdq2ps, vcvtne2ps2bf16) cost ~7x the table
look-up in L2 on Zen 4 (1 thread, same run), so at one row the kernel was bound by it, not by memory. An odd K
gets a zero column; the kernel pads x to match.

W8A8 (`dynamic_linear`, compressed-tensors checkpoints with dynamic per-token activations): the caller quantizes
each row of x to int8 (qx, x_scale); int8 x int8 products are summed exactly in int32 by `vpdpbusd` (VNNI), which
multiplies unsigned by signed bytes, so x goes in as qx + 128 and 128 * sum_k q[n, k] (`compensation`, made at
packing) is taken off; then y = R(R(sum * x_scale) * scale) + bias with torch's roundings, so the result equals
`torch._int_mm` followed by the same float ops, bit for bit. Layout (`pack_weight_w8a8`): [ceil(N/32), ceil(K/4),
32, 4], element [p, s, n, e] = q[32p + n, 4s + e]; no widening, so more rows just re-read the panel from L2.

Runs where the CPU has AVX-512 BF16, BW, VBMI and VNNI (AMD Zen 4, Intel Sapphire Rapids and later), the extension built
and `cpu_kernels` is not "off" (`fovea.kernels.status().int8_linear` says which and why).
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


def _step_order() -> torch.Tensor:
    """[64]: the weight (2n + e of the step) stored at each byte of a step: byte 16l + i is weight 8l + i for
    i < 8 (columns 0-15, from vpunpcklbw) and 32 + 8l + i - 8 otherwise (columns 16-31, from vpunpckhbw)."""
    lane, i = torch.arange(64) // 16, torch.arange(64) % 16
    return torch.where(i < 8, 8 * lane + i, 32 + 8 * lane + i - 8)


STEP_ORDER = _step_order()


def pack_weight(q: torch.Tensor, huge_pages: bool = True) -> torch.Tensor:
    """q [N, K] int8 -> [ceil(N/32), ceil(K/2), 64] uint8 codes (the module docstring's layout), asked to live on
    2 MiB pages before it is written unless `huge_pages` is False, as the bfloat16 kernel's panels are
    (`fovea.kernels.panels.empty_packed` says when not): decode streams them, and on 4 KiB pages the hardware
    prefetcher stops at every page."""
    n, k = q.shape
    padded = F.pad(q.detach(), (0, k % 2, 0, -n % PANEL))
    steps = padded.view(-1, PANEL, (k + 1) // 2, 2).permute(0, 2, 1, 3).reshape(-1, (k + 1) // 2, 2 * PANEL)
    wide = steps[..., STEP_ORDER].to(torch.int16)
    codes = torch.where(wide == -128, 0x80, torch.where(wide < 0, 0x80 - wide, wide))  # -1 -> 0x81, -127 -> 0xFF
    packed = torch.empty(codes.shape, dtype=torch.uint8)
    module = extension()
    if module is not None and huge_pages:
        module.advise_huge_pages(packed)
    return packed.copy_(codes)


def unpack_weight(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The [N, K] int8 matrix `pack_weight` was given."""
    num_panels, num_pairs = packed.shape[:2]
    codes = packed.to(torch.int16)
    values = torch.where(codes == 0x80, -128, torch.where(codes > 0x80, 128 - codes, codes))
    steps = torch.empty_like(values)
    steps[..., STEP_ORDER] = values
    q = steps.view(num_panels, num_pairs, PANEL, 2).permute(0, 2, 1, 3).reshape(num_panels * PANEL, num_pairs * 2)
    return q[:out_features, :in_features].to(torch.int8).contiguous()


def pack_weight_w8a8(q: torch.Tensor, huge_pages: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, K] int8 -> (packed [ceil(N/32), ceil(K/4), 32, 4], element [p, s, n, e] = q[32p + n, 4s + e], 0 past
    the end; compensation [N] int32 = 128 * sum_k q[n, k]). `huge_pages`: as `pack_weight`."""
    n, k = q.shape
    padded = F.pad(q.detach(), (0, -k % 4, 0, -n % PANEL))
    quads = padded.view(-1, PANEL, (k + 3) // 4, 4).permute(0, 2, 1, 3)
    packed = torch.empty(quads.shape, dtype=torch.int8)
    module = extension()
    if module is not None and huge_pages:
        module.advise_huge_pages(packed)
    return packed.copy_(quads), (q.to(torch.int32).sum(dim=1) * 128).to(torch.int32)


def unpack_weight_w8a8(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The [N, K] int8 matrix `pack_weight_w8a8` was given."""
    num_panels, num_quads = packed.shape[:2]
    q = packed.permute(0, 2, 1, 3).reshape(num_panels * PANEL, num_quads * 4)
    return q[:out_features, :in_features].contiguous()


def dynamic_linear(qx: torch.Tensor, x_scale: torch.Tensor, packed: torch.Tensor, compensation: torch.Tensor,
                   out_features: int, scale: torch.Tensor, bias: torch.Tensor | None,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """qx [M, K] int8 with x_scale [M] or [M, 1] (one row each) -> [M, N] in `out_dtype` (float32 or bfloat16):
    R(R(R(sum_k qx * q) * x_scale) * scale) + bias, the sums exact in int32 (see the module docstring)."""
    return _module().int8_dynamic_linear(qx, x_scale, packed, compensation, out_features, scale, bias, out_dtype)


def _module():
    module = extension()
    if module is None or not available():
        raise RuntimeError(f"fovea's int8 linear kernel does not run here "
                           f"({RUNTIME.status().int8_linear.describe()})")
    return module


def linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, scale: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] bfloat16 -> [..., N] bfloat16; `packed` from `pack_weight`, `scale` and `bias` [N] (any float
    dtype; used as float32)."""
    module = _module()
    # the models' flat batch [N, K] goes straight in: the reshape and view around the call cost ~5 us of a decode
    # step's ~40 us layer (1 row, 1 thread, AMD EPYC), as fovea/kernels/bf16_linear.py found for its kernel
    if x.dim() == 2:
        return module.int8_linear(x, packed, out_features, scale, bias)
    flat = x.reshape(-1, x.shape[-1])
    return module.int8_linear(flat, packed, out_features, scale, bias).view(*x.shape[:-1], out_features)

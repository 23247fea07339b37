"""fovea's bfloat16 linear kernel on Intel AMX: y = x @ W^T + b, float32 accumulation, rounded once.

Why not oneDNN's packed linear, which also runs AMX here (measured on this 2-vCPU Sapphire Rapids VM, Qwen2-0.5B's
shapes, weights cold):

- Decode is a stream over the weights. oneDNN reads them at 8-11 GB/s at 32 rows; this kernel at 12-14 GB/s (a
  plain `sum` reads ~14): each 32-column panel is one contiguous run of memory, prefetched 2 KB ahead.
- The two vCPUs share their physical cores with other tenants' hyperthreads, and whichever core has a busy
  neighbour often runs AMX code at a third of the other's speed (same kernel pinned to each: 690 vs 170-290
  GFLOP/s; which core is slow changes from minute to minute). oneDNN splits the columns in two fixed halves and
  waits for the slow half; here each thread takes the next group of panels from a shared counter
  (`cpp_build.WORK_COUNTER`) until none is left.
- Prefill outputs that will not stay in cache anyway (more than 256 rows) are written with streaming stores.

Layout: W [N, K] is packed once into [N/32, K/32, 2, 16, 16, 2] (`pack_weight`): for each 32-column panel and
each 32-wide step along K, the two AMX B tiles of 16 columns each, in the pair-interleaved (VNNI) order the tile
multiply reads. Rows go 32 at a time (C tiles 2 x 2: rows 0-15 / 16-31 by columns 0-15 / 16-31; A tiles of 16 rows
x 32 k read straight from x); a block of at most 16 rows uses the top half only, and a partial block is first
copied into a zero-padded buffer. Bias is added in float32 and the result rounded to nearest even by
VCVTNE2PS2BF16, which reads float32 denormals as zero (only results below 1.2e-38 in magnitude differ from
torch's rounding). Only the summation order differs from a float32 matmul of the same bfloat16 inputs.

`available()` is False without AMX-BF16, when Linux does not grant the tile state (arch_prctl
ARCH_REQ_XCOMP_PERM), when the module cannot be built, or with FOVEA_NO_AMX_LINEAR=1; callers then use oneDNN.
"""
from __future__ import annotations

import functools
import os

import torch

from fovea.layers.cpp_build import WORK_COUNTER, load_kernels

BLOCK = 32
"""K and N must be multiples of this (one tile step along K, one column panel)."""

_SOURCE = WORK_COUNTER + r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

struct TileConfig {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

constexpr int kPrefetchAhead = 2048;  // bytes of the weight stream fetched ahead of the tile loads (decode)
constexpr int64_t kStreamRows = 256;  // more rows than this: the output bypasses the cache

void configure_tiles() {  // tmm0-3 C (16 x 16 float), tmm4-5 A (16 x 32 bf16), tmm6-7 B (16 x 16 pairs)
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// c[32][32] = x rows (16 or 32 of them, row stride K) times one packed 32-column panel
template <bool kTwoRowTiles, bool kPrefetch>
void multiply_panel(const uint16_t* x, int64_t K, const uint16_t* panel, float* c) {
  _tile_zero(0);
  _tile_zero(1);
  if (kTwoRowTiles) {
    _tile_zero(2);
    _tile_zero(3);
  }
  const int64_t stride = K * 2;
  for (int64_t k = 0; k < K; k += 32, panel += 1024) {
    if (kPrefetch) {
      const char* ahead = reinterpret_cast<const char*>(panel) + kPrefetchAhead;
      for (int line = 0; line < 2048; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
    }
    _tile_loadd(4, x + k, stride);
    _tile_loadd(6, panel, 64);
    _tile_loadd(7, panel + 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (kTwoRowTiles) {
      _tile_loadd(5, x + 16 * K + k, stride);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, 128);
  _tile_stored(1, c + 16, 128);
  if (kTwoRowTiles) {
    _tile_stored(2, c + 512, 128);
    _tile_stored(3, c + 528, 128);
  }
}

void write_rows(const float* c, const float* bias, uint16_t* y, int64_t rows, int64_t ldy, bool stream) {
  const __m512 b0 = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  const __m512 b1 = bias ? _mm512_loadu_ps(bias + 16) : _mm512_setzero_ps();
  for (int64_t m = 0; m < rows; ++m) {
    const __m512 lo = _mm512_add_ps(_mm512_load_ps(c + m * 32), b0);
    const __m512 hi = _mm512_add_ps(_mm512_load_ps(c + m * 32 + 16), b1);
    const __m512i out = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
    if (stream) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(y + m * ldy), out);
    } else {
      _mm512_storeu_si512(y + m * ldy, out);
    }
  }
}

}  // namespace

bool enable_amx() {
  constexpr long kReqXcompPerm = 0x1023, kXfeatureTileData = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureTileData) == 0;
}

torch::Tensor amx_linear(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              "x must be a contiguous bfloat16 [M, K] tensor");
  TORCH_CHECK(packed.dim() == 6 && packed.is_contiguous() && packed.scalar_type() == at::kBFloat16 &&
              packed.size(2) == 2 && packed.size(3) == 16 && packed.size(4) == 16 && packed.size(5) == 2,
              "packed must be pack_weight's [N/32, K/32, 2, 16, 16, 2] bfloat16 tensor");
  const int64_t M = x.size(0), K = x.size(1), panels = packed.size(0), N = panels * 32;
  TORCH_CHECK(packed.size(1) * 32 == K, "x has ", K, " columns; the packed weight takes ", packed.size(1) * 32);
  const float* b = nullptr;
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous() &&
                bias->scalar_type() == at::kFloat, "bias must be a contiguous float32 [N] tensor");
    b = bias->data_ptr<float>();
  }
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const int64_t row_blocks = (M + 31) / 32;
  // one work item: `width` panels times every row block. One row block (decode) streams the weights once;
  // several reuse a panel group of <= 1 MiB from L2 across the row blocks. At least 4 items per thread, so a
  // fast thread can take over a slow one's share.
  const int64_t cap = std::min<int64_t>(16, panels / (4 * at::get_num_threads()));
  const int64_t width = std::clamp<int64_t>(row_blocks == 1 ? panels / 16 : (1 << 20) / (K * 64), 1,
                                            std::max<int64_t>(cap, 1));
  WorkCounter items((panels + width - 1) / width);
  const bool stream = M > kStreamRows;
  // a last row block of other than 16 or 32 rows is read from a zero-padded copy, made once for every item
  const int64_t tail_rows = M - (row_blocks - 1) * 32;
  std::vector<uint16_t> tail;
  if (tail_rows != 16 && tail_rows != 32) {
    tail.assign(32 * K, 0);
    std::memcpy(tail.data(), xp + (row_blocks - 1) * 32 * K, tail_rows * K * sizeof(uint16_t));
  }
  // one row block (decode) streams the weights from memory: prefetch them
  const bool prefetch = row_blocks == 1;
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    configure_tiles();
    alignas(64) float c[32 * 32];
    for (int64_t item; items.take(item);) {
      const int64_t p0 = item * width, p1 = std::min(panels, p0 + width);
      for (int64_t rb = 0; rb < row_blocks; ++rb) {
        const int64_t rows = std::min<int64_t>(32, M - rb * 32);
        const uint16_t* xa = rb == row_blocks - 1 && !tail.empty() ? tail.data() : xp + rb * 32 * K;
        const auto multiply = rows > 16 ? (prefetch ? multiply_panel<true, true> : multiply_panel<true, false>)
                                        : (prefetch ? multiply_panel<false, true> : multiply_panel<false, false>);
        for (int64_t p = p0; p < p1; ++p) {
          multiply(xa, K, wp + p * K * 32, c);
          write_rows(c, b ? b + p * 32 : nullptr, yp + rb * 32 * N + p * 32, rows, N, stream);
        }
      }
    }
    if (stream) _mm_sfence();  // each thread orders its own streaming stores before the region ends
    _tile_release();
  });
  return y;
}
"""


@functools.cache
def _kernels():
    if not _cpu_has_amx_bf16():
        return None
    module = load_kernels("fovea_amx_linear_v5", _SOURCE, ["enable_amx", "amx_linear"],
                          extra_cflags=("-mamx-tile", "-mamx-bf16", "-mavx512f", "-mavx512bf16"))
    return module if module is not None and module.enable_amx() else None


def _cpu_has_amx_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags and "amx_tile" in flags and "avx512_bf16" in flags


def available() -> bool:
    """This kernel can run here (see the module docstring)."""
    return os.environ.get("FOVEA_NO_AMX_LINEAR") != "1" and _kernels() is not None


def supports(weight: torch.Tensor) -> bool:
    """`weight` [N, K] can be packed for this kernel: a CPU bfloat16 matrix with K and N multiples of 32."""
    return (weight.dim() == 2 and weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and weight.shape[0] % BLOCK == 0 and weight.shape[1] % BLOCK == 0 and weight.numel() > 0
            and available())


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """W [N, K] -> [N/32, K/32, 2, 16, 16, 2]: element [p, s, h, r, n, e] is W[32p + 16h + n, 32s + 2r + e]."""
    n, k = weight.shape
    return (weight.detach().reshape(n // BLOCK, 2, 16, k // BLOCK, 16, 2)
            .permute(0, 3, 1, 4, 2, 5).contiguous())


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] bfloat16 -> [..., N] bfloat16; `packed` from `pack_weight`, `bias` float32 [N] or None."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    return _kernels().amx_linear(flat, packed, bias).view(*x.shape[:-1], packed.shape[0] * BLOCK)

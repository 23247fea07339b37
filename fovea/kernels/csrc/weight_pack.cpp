// Repacking a loaded weight into the 32-column panel layout of the bfloat16 kernels (amx_linear.cpp and
// bf16_linear.cpp read it), once per layer at load; fovea/kernels/panels.py says what the layout is and why it
// lives on 2 MiB pages.
//
// Why in C++: torch's copy of the 6-d permuted view moves one 2-byte element at a time and ran at ~0.35 GB per
// CPU-second on the AMD EPYC (BLIP-2 OPT-2.7b: most of loading's time). The layout is a 16 x 16 transpose of
// 32-bit k pairs per (panel, step, half), so this copies whole pairs, reading each source row's 64 bytes once,
// and the threads split the panels: the source is usually the checkpoint's memory-mapped pages, read once here.
#include <ATen/Parallel.h>

#include <cstring>

#include "common.h"
#include "ops.h"

namespace fovea {
namespace {

constexpr int64_t kBlock = 32;  // columns of a panel; k per step

// One (panel, step, half) of 16 columns x 16 k pairs: dst[r][n] = the pair (W[row0 + n, 2(pair0 + r)], +1).
// `rows` and `pairs` count the real ones (fewer at the edges: zeros past them); `odd` means the last real pair
// has only its first element (K odd).
void pack_block(const uint16_t* src, int64_t row_stride, int64_t row0, int64_t rows, int64_t pair0, int64_t pairs,
                bool odd, uint32_t* dst) {
  if (rows == 16 && pairs == 16 && !odd) {
    for (int n = 0; n < 16; ++n) {
      const uint16_t* row = src + (row0 + n) * row_stride + 2 * pair0;
      uint32_t line[16];
      std::memcpy(line, row, sizeof(line));  // the row may sit at any 2-byte offset in the file
      for (int r = 0; r < 16; ++r) dst[r * 16 + n] = line[r];
    }
    return;
  }
  std::memset(dst, 0, 16 * 16 * sizeof(uint32_t));
  for (int64_t n = 0; n < rows; ++n) {
    const uint16_t* row = src + (row0 + n) * row_stride + 2 * pair0;
    for (int64_t r = 0; r < pairs; ++r) {
      const bool half = odd && r == pairs - 1;
      const uint32_t lo = row[2 * r], hi = half ? 0 : row[2 * r + 1];
      dst[r * 16 + n] = lo | (hi << 16);  // little-endian: element e = 0 is the low half of the pair
    }
  }
}

}  // namespace

void pack_panels_(const at::Tensor& packed, const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.element_size() == 2 && (weight.stride(1) == 1 || weight.size(1) <= 1),
              "weight must be a 2-byte [N, K] matrix with contiguous rows (bfloat16 or float16)");
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t panels = (N + kBlock - 1) / kBlock, steps = (K + kBlock - 1) / kBlock;
  TORCH_CHECK(packed.dim() == 6 && packed.is_contiguous() && packed.scalar_type() == weight.scalar_type() &&
              packed.size(0) == panels && packed.size(1) == steps && packed.size(2) == 2 && packed.size(3) == 16 &&
              packed.size(4) == 16 && packed.size(5) == 2,
              "packed must be a contiguous [", panels, ", ", steps, ", 2, 16, 16, 2] tensor of the weight's dtype");
  if (N == 0 || K == 0) return;
  const auto* src = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  auto* dst = reinterpret_cast<uint32_t*>(packed.data_ptr());
  const int64_t row_stride = weight.stride(0), pairs = (K + 1) / 2;
  // one panel per item; each thread writes its own run of the destination (its pages faulted by that thread)
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t s = 0; s < steps; ++s) {
        for (int64_t h = 0; h < 2; ++h) {
          const int64_t row0 = p * kBlock + h * 16, pair0 = s * 16;
          const int64_t rows = std::clamp<int64_t>(N - row0, 0, 16);
          const int64_t num_pairs = std::clamp<int64_t>(pairs - pair0, 0, 16);
          const bool odd = (K % 2) && pair0 + num_pairs == pairs;
          pack_block(src, row_stride, row0, rows, pair0, num_pairs, odd, dst + ((p * steps + s) * 2 + h) * 256);
        }
      }
    }
  });
}

}  // namespace fovea

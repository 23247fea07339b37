// bfloat16 linear on AVX-512 BF16 (VDPBF16PS): y = x @ W^T + b, float32 accumulation, rounded once. Reads the
// weight in the panel layout of the AMX kernel (fovea/kernels/bf16_linear.py says why and what it measures).
//
// Compiled on every x86-64 host, like amx_linear.cpp: the functions carry a target attribute, Python runs them
// only where the CPU reports avx512_bf16.
#include <ATen/Parallel.h>

#include <memory>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "common.h"
#include "ops.h"

namespace fovea {

#ifdef FOVEA_AVX512_BF16
namespace {

constexpr int kMaxTileRows = 12;      // rows of one micro-tile: 2 x 12 float32 accumulators of 16 columns
constexpr int kStepElements = 1024;   // one 32-k step of one panel: [2 halves][16 pairs][16 columns][2]
constexpr int64_t kSerialPackBlocks = 4;  // up to 48 rows of x are packed by the calling thread

// Rows of x times one 32-column panel over the whole of K: out[m][0..31] in float32. `a` holds the rows' k pairs
// (x[m, 2j], x[m, 2j+1]) as 32-bit words, pair-major ([K/2][kRows], `pack_rows`), so every broadcast is at a
// constant offset from one pointer; a pair is broadcast against the 16 columns x 2 k of one 64-byte row of the
// panel, so no horizontal sum is ever needed. Each output sums its pairs in order whatever kRows is, so a row
// gets the same bits in any batch (decode is batch-invariant). Independent partial sums for few rows would break
// their multiply-add chain (and that invariance); at 1 row the chain (2 VDPBF16PS per 128 bytes, ~6
// cycles each) still consumes ~20 bytes a cycle, above what one core reads from memory, and measured no faster.
//
// Two loops share that arithmetic. 1 to 4 rows (decode), `multiply_panel_ordered`: the loads go in address
// order, a step's half 0 (16 lines, columns 0-15) before its half 1, each load a volatile asm, which the compiler
// keeps in program order (the arithmetic still moves freely around them). Left to the compiler, a step's loads
// were issued as line 0, 16, 1, 17, ... (the two halves interleaved, the first ones rotated from the loop's end),
// and the hardware prefetcher, which learns from the order loads are issued in, ran so little ahead that one row
// read at ~45% of the same loop in order (AMD EPYC Zen 4, 1 thread; the 16 KB software prefetch brought it to
// ~60%; in order with no software prefetch it reads about what `torch.sum` does: benchmarks/read_patterns.py,
// benchmarks/gemv_ab.py). An empty asm with a memory clobber between groups of loads ordered them too, but made
// gcc keep the sums in memory. 5 to 12 rows, `multiply_panel_wide`: as before.
FOVEA_BF16_TARGET inline __m512bh ordered_load(const uint16_t* p) {
  __m512i v;
  asm volatile("vmovdqu64 %1, %0" : "=v"(v) : "m"(*reinterpret_cast<const __m512i*>(p)));
  return (__m512bh)v;
}

// acc += the pair at `pair` (broadcast to 16 lanes) . b, VDPBF16PS with the broadcast folded into it: written
// as the intrinsics, gcc kept the 16 x kRows broadcasts of a step in registers for the second half, and spilled
FOVEA_BF16_TARGET inline void dot_pair(__m512& acc, __m512bh b, const int32_t* pair) {
  asm("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(b), "m"(*pair));
}

template <int kRows>
FOVEA_BF16_TARGET void multiply_panel_ordered(const int32_t* a, const uint16_t* panel, int64_t steps, __m512* out) {
  __m512 acc0[kRows], acc1[kRows];  // columns 0-15 and 16-31 of each row
#pragma GCC unroll 12
  for (int m = 0; m < kRows; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
  for (int64_t step = 0; step < steps; ++step, panel += kStepElements, a += 16 * kRows) {
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) {
      const __m512bh b = ordered_load(panel + r * 32);
#pragma GCC unroll 12
      for (int m = 0; m < kRows; ++m) dot_pair(acc0[m], b, a + r * kRows + m);
    }
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) {
      const __m512bh b = ordered_load(panel + 512 + r * 32);
#pragma GCC unroll 12
      for (int m = 0; m < kRows; ++m) dot_pair(acc1[m], b, a + r * kRows + m);
    }
  }
#pragma GCC unroll 12
  for (int m = 0; m < kRows; ++m) {
    out[2 * m] = acc0[m];
    out[2 * m + 1] = acc1[m];
  }
}

// 5 to 12 rows (prefill's tiles, larger decode batches): each line feeds 5-12 multiply-adds, so the arithmetic,
// not the order of the loads, sets the pace (the ordered loop above measured 0.8-0.9x this one at 8 and 12 rows);
// the two halves go line by line, one broadcast of x's pair for both.
template <int kRows, bool kPrefetch>
FOVEA_BF16_TARGET void multiply_panel_wide(const int32_t* a, const uint16_t* panel, int64_t steps, __m512* out) {
  __m512 acc[kRows][2];
  for (int m = 0; m < kRows; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t step = 0; step < steps; ++step, panel += kStepElements, a += 16 * kRows) {
    if (kPrefetch) {
      const char* ahead = reinterpret_cast<const char*>(panel) + kWeightPrefetchBytes;
      for (int line = 0; line < 2 * kStepElements; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T1);
    }
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) {
      const __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel + r * 32);
      const __m512bh b1 = (__m512bh)_mm512_loadu_si512(panel + 512 + r * 32);
#pragma GCC unroll 12
      for (int m = 0; m < kRows; ++m) {
        const __m512bh x = (__m512bh)_mm512_set1_epi32(a[r * kRows + m]);
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], x, b0);
        acc[m][1] = _mm512_dpbf16_ps(acc[m][1], x, b1);
      }
    }
  }
  for (int m = 0; m < kRows; ++m) {
    out[2 * m] = acc[m][0];
    out[2 * m + 1] = acc[m][1];
  }
}

// rows [r0, r0 + rows) of x [M, K] as the panel loops read them: dst[j * rows + m] = pair j of row r0 + m, for
// j < pairs (K padded to whole steps; pairs past the real K are zero, so they meet the padding's zero weights
// and never stray bits, a NaN)
void pack_rows(const uint16_t* x, int64_t ldx, int64_t K, int64_t r0, int rows, int64_t pairs, int32_t* dst) {
  for (int m = 0; m < rows; ++m) {
    const uint16_t* row = x + (r0 + m) * ldx;
    const int64_t whole = K / 2;
    for (int64_t j = 0; j < whole; ++j) {
      int32_t pair;
      std::memcpy(&pair, row + 2 * j, sizeof(pair));
      dst[j * rows + m] = pair;
    }
    for (int64_t j = whole; j < pairs; ++j) {
      const uint32_t low = 2 * j < K ? row[2 * j] : 0;
      dst[j * rows + m] = static_cast<int32_t>(low);
    }
  }
}

using PanelFn = void (*)(const int32_t*, const uint16_t*, int64_t, __m512*);

template <int kRows>
PanelFn panel_fn(bool prefetch) {
  return prefetch ? multiply_panel_wide<kRows, true> : multiply_panel_wide<kRows, false>;
}

// 1-4 rows: the loads in order, the hardware prefetcher alone (the software prefetch read slower with them)
PanelFn select_panel_fn(int rows, bool prefetch) {
  switch (rows) {
    case 1: return multiply_panel_ordered<1>;
    case 2: return multiply_panel_ordered<2>;
    case 3: return multiply_panel_ordered<3>;
    case 4: return multiply_panel_ordered<4>;
    case 5: return panel_fn<5>(prefetch);
    case 6: return panel_fn<6>(prefetch);
    case 7: return panel_fn<7>(prefetch);
    case 8: return panel_fn<8>(prefetch);
    case 9: return panel_fn<9>(prefetch);
    case 10: return panel_fn<10>(prefetch);
    case 11: return panel_fn<11>(prefetch);
    default: return panel_fn<12>(prefetch);
  }
}

// bias added in float32, rounded to nearest even (VCVTNE2PS2BF16), only the panel's real columns written
FOVEA_BF16_TARGET void write_rows(const __m512* c, const float* bias, uint16_t* y, int rows, int64_t ldy,
                                  int columns) {
  const __mmask32 mask = static_cast<__mmask32>((1ull << columns) - 1);  // columns in 1..32
  const __m512 b0 = bias ? _mm512_maskz_loadu_ps(static_cast<__mmask16>(mask), bias) : _mm512_setzero_ps();
  const __m512 b1 = bias ? _mm512_maskz_loadu_ps(static_cast<__mmask16>(mask >> 16), bias + 16) : _mm512_setzero_ps();
  for (int m = 0; m < rows; ++m) {
    const __m512i out = (__m512i)_mm512_cvtne2ps_pbh(_mm512_add_ps(c[2 * m + 1], b1), _mm512_add_ps(c[2 * m], b0));
    _mm512_mask_storeu_epi16(y + m * ldy, mask, out);
  }
}

// One call's operands and its split: `width` panels times every row block per work item.
struct Job {
  const int32_t* a;      // x's rows, `pack_rows` for each row block, block after block
  const uint16_t* w;     // packed [N_pad/32, K_pad/32, 2, 16, 16, 2]
  const float* bias;     // [N] or nullptr
  uint16_t* y;           // [M, N]
  int64_t M, steps, N, panels, width;
  std::vector<int64_t> block_starts;  // row blocks of at most kMaxTileRows, as even as they come
  bool prefetch;  // the wide rows' software prefetch
};

FOVEA_BF16_TARGET void run_items(const Job& job, RangeSplit& items, int64_t range) {
  __m512 c[2 * kMaxTileRows];
  const int64_t num_blocks = static_cast<int64_t>(job.block_starts.size()) - 1;
  for (int64_t item; items.take(range, item);) {
    const int64_t p0 = item * job.width, p1 = std::min(job.panels, p0 + job.width);
    for (int64_t rb = 0; rb < num_blocks; ++rb) {
      const int64_t r0 = job.block_starts[rb];
      const int rows = static_cast<int>(job.block_starts[rb + 1] - r0);
      const PanelFn multiply = select_panel_fn(rows, job.prefetch);
      for (int64_t p = p0; p < p1; ++p) {
        multiply(job.a + r0 * job.steps * 16, job.w + p * job.steps * kStepElements, job.steps, c);
        const int columns = static_cast<int>(std::min<int64_t>(32, job.N - p * 32));
        write_rows(c, job.bias ? job.bias + p * 32 : nullptr, job.y + r0 * job.N + p * 32, rows, job.N, columns);
      }
    }
  }
}

}  // namespace

bool bf16_linear_compiled() { return true; }

bool advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (start + kHuge - 1) & ~(kHuge - 1), hi = (start + t.nbytes()) & ~(kHuge - 1);
  return hi > lo && madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE) == 0;
#else
  return false;
#endif
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1,
              "x must be a bfloat16 [M, K] tensor with contiguous rows");
  TORCH_CHECK(packed.dim() == 6 && packed.is_contiguous() && packed.scalar_type() == at::kBFloat16 &&
              packed.size(2) == 2 && packed.size(3) == 16 && packed.size(4) == 16 && packed.size(5) == 2,
              "packed must be pack_weight's [N/32, K/32, 2, 16, 16, 2] bfloat16 tensor");
  const int64_t M = x.size(0), K = x.size(1), panels = packed.size(0), steps = packed.size(1);
  const int64_t N = out_features;
  TORCH_CHECK(K <= steps * 32 && K > (steps - 1) * 32, "x has ", K, " columns; the packed weight takes ",
              (steps - 1) * 32 + 1, " to ", steps * 32);
  TORCH_CHECK(N <= panels * 32 && N > (panels - 1) * 32, "out_features ", N, " does not fit the packed weight's ",
              panels, " panels of 32 columns");
  const float* b = nullptr;
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous() &&
                bias->scalar_type() == at::kFloat, "bias must be a contiguous float32 [", N, "] tensor");
    b = bias->data_ptr<float>();
  }
  auto y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  std::vector<int64_t> starts;
  const int64_t num_blocks = (M + kMaxTileRows - 1) / kMaxTileRows;
  for (int64_t i = 0; i <= num_blocks; ++i) starts.push_back(i * M / num_blocks);
  // x's rows as the micro-kernel reads them (K padded to whole steps), once for every panel. One row of whole
  // steps is read as it is. Few rows are packed here (microseconds); a parallel region for them would cost a
  // second wait for both threads, which on a busy host is where the time goes.
  const int64_t pairs = steps * 16;
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  std::unique_ptr<int32_t[]> packed_x;
  const int32_t* a = reinterpret_cast<const int32_t*>(xp);
  if (M > 1 || K != steps * 32 || reinterpret_cast<uintptr_t>(xp) % alignof(int32_t) != 0) {
    packed_x.reset(new int32_t[M * pairs]);
    auto pack = [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) {
        pack_rows(xp, x.stride(0), K, starts[i], static_cast<int>(starts[i + 1] - starts[i]), pairs,
                  packed_x.get() + starts[i] * pairs);
      }
    };
    if (num_blocks <= kSerialPackBlocks) {
      pack(0, num_blocks);
    } else {
      at::parallel_for(0, num_blocks, 1, pack);
    }
    a = packed_x.get();
  }
  // one work item: `width` panels times every row block. One row block (decode) streams the weights once; more
  // reuse a panel group of <= 1 MiB from L2 across the row blocks. At least 4 items per thread, so a fast
  // thread can take over a slow one's share; each thread streams its own contiguous run of them (RangeSplit).
  const int64_t cap = std::min<int64_t>(16, panels / (4 * at::get_num_threads()));
  const int64_t width = std::clamp<int64_t>(num_blocks == 1 ? panels / 16 : (1 << 19) / (steps * 2048), 1,
                                            std::max<int64_t>(cap, 1));
  const Job job{a,
                reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>()),
                b,
                reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()),
                M, steps, N, panels, width, std::move(starts),
                /*prefetch=*/num_blocks <= 2};  // few row blocks (decode): the weights stream from memory
  RangeSplit items((panels + width - 1) / width, at::get_num_threads());
  at::parallel_for(0, items.num_ranges, 1, [&](int64_t begin, int64_t end) {
    for (int64_t range = begin; range < end; ++range) run_items(job, items, range);
  });
  return y;
}

#else  // no AVX-512 BF16 code from this compiler or on this architecture: Python sees bf16_linear_compiled() false

bool bf16_linear_compiled() { return false; }
bool advise_huge_pages(const at::Tensor&) { return false; }
at::Tensor bf16_linear(const at::Tensor&, const at::Tensor&, int64_t, const std::optional<at::Tensor>&) {
  TORCH_CHECK(false, "fovea's AVX-512 BF16 linear kernel was not compiled (x86-64 with gcc >= 10 or clang >= 9)");
}

#endif

}  // namespace fovea

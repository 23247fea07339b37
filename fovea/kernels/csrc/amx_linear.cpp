// bfloat16 linear on Intel AMX: y = x @ W^T + b, float32 accumulation, rounded once. The layout, the work split
// and why it beats oneDNN here are described in fovea/kernels/amx_linear.py.
//
// Compiled on every x86-64 host, AMX or not: the functions that use AMX and AVX-512 BF16 carry a target
// attribute instead of the whole extension being built with -mamx-*, so the rest of the binary stays within
// what -march=native allows, and a broken AMX kernel fails the build on any host. Python runs them only after
// checking the CPU (cpuinfo's amx_bf16, amx_tile, avx512_bf16) and asking Linux for the tile state
// (enable_amx).
#include <ATen/Parallel.h>

#include <vector>

#include "common.h"
#include "ops.h"

// gcc 11 and clang 12 are the first to know the AMX intrinsics
#if defined(__x86_64__) && (defined(__clang__) ? __clang_major__ >= 12 : (defined(__GNUC__) && __GNUC__ >= 11))
#define FOVEA_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define FOVEA_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bf16")))
#endif

namespace fovea {

#ifdef FOVEA_AMX
namespace {

struct TileConfig {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

constexpr int kPrefetchAhead = 2048;  // bytes of the weight stream fetched ahead of the tile loads (decode)
constexpr int64_t kStreamRows = 256;  // more rows than this: the output bypasses the cache

FOVEA_AMX_TARGET void configure_tiles() {  // tmm0-3 C (16 x 16 float), tmm4-5 A (16 x 32 bf16), tmm6-7 B
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
FOVEA_AMX_TARGET void multiply_panel(const uint16_t* x, int64_t K, const uint16_t* panel, float* c) {
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

FOVEA_AMX_TARGET void write_rows(const float* c, const float* bias, uint16_t* y, int64_t rows, int64_t ldy,
                                 bool stream) {
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

// One call's operands and its split: `width` panels times every row block per work item.
struct Job {
  const uint16_t* x;      // [M, K]
  const uint16_t* tail;   // a zero-padded copy of a partial last row block [32, K], or nullptr
  const uint16_t* w;      // packed [N/32, K/32, 2, 16, 16, 2]
  const float* bias;      // [N] or nullptr
  uint16_t* y;            // [M, N]
  int64_t M, K, N, panels, width, row_blocks;
  bool stream, prefetch;
};

// One thread's share: work items from the counter until none is left (the lambda handed to parallel_for only
// calls this, so the whole loop is compiled for AMX and its helpers inline as before)
FOVEA_AMX_TARGET void run_items(const Job& job, WorkCounter& items) {
  configure_tiles();
  alignas(64) float c[32 * 32];
  for (int64_t item; items.take(item);) {
    const int64_t p0 = item * job.width, p1 = std::min(job.panels, p0 + job.width);
    for (int64_t rb = 0; rb < job.row_blocks; ++rb) {
      const int64_t rows = std::min<int64_t>(32, job.M - rb * 32);
      const uint16_t* xa = rb == job.row_blocks - 1 && job.tail ? job.tail : job.x + rb * 32 * job.K;
      const auto multiply = rows > 16 ? (job.prefetch ? multiply_panel<true, true> : multiply_panel<true, false>)
                                      : (job.prefetch ? multiply_panel<false, true> : multiply_panel<false, false>);
      for (int64_t p = p0; p < p1; ++p) {
        multiply(xa, job.K, job.w + p * job.K * 32, c);
        write_rows(c, job.bias ? job.bias + p * 32 : nullptr, job.y + rb * 32 * job.N + p * 32, rows, job.N,
                   job.stream);
      }
    }
  }
  if (job.stream) _mm_sfence();  // each thread orders its own streaming stores before the region ends
  _tile_release();
}

}  // namespace

bool amx_compiled() { return true; }

bool enable_amx() {
  constexpr long kReqXcompPerm = 0x1023, kXfeatureTileData = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureTileData) == 0;
}

at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias) {
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
  auto y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const int64_t row_blocks = (M + 31) / 32;
  // one work item: `width` panels times every row block. One row block (decode) streams the weights once;
  // several reuse a panel group of <= 1 MiB from L2 across the row blocks. At least 4 items per thread, so a
  // fast thread can take over a slow one's share.
  const int64_t cap = std::min<int64_t>(16, panels / (4 * at::get_num_threads()));
  const int64_t width = std::clamp<int64_t>(row_blocks == 1 ? panels / 16 : (1 << 20) / (K * 64), 1,
                                            std::max<int64_t>(cap, 1));
  // a last row block of other than 16 or 32 rows is read from a zero-padded copy, made once for every item
  const int64_t tail_rows = M - (row_blocks - 1) * 32;
  std::vector<uint16_t> tail;
  if (tail_rows != 16 && tail_rows != 32) {
    tail.assign(32 * K, 0);
    std::memcpy(tail.data(), xp + (row_blocks - 1) * 32 * K, tail_rows * K * sizeof(uint16_t));
  }
  const Job job{xp,
                tail.empty() ? nullptr : tail.data(),
                reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>()),
                b,
                reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()),
                M, K, N, panels, width, row_blocks,
                /*stream=*/M > kStreamRows,
                /*prefetch=*/row_blocks == 1};  // one row block (decode) streams the weights from memory
  WorkCounter items((panels + width - 1) / width);
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) { run_items(job, items); });
  return y;
}

#else  // no AMX code from this compiler or on this architecture: Python sees amx_compiled() false

bool amx_compiled() { return false; }
bool enable_amx() { return false; }
at::Tensor amx_linear(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&) {
  TORCH_CHECK(false, "fovea's AMX linear kernel was not compiled (x86-64 with gcc >= 11 or clang >= 12 only)");
}

#endif

}  // namespace fovea

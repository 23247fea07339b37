// int8 weight-only linear (W8A16) on AVX-512 BF16: y = R(scale * (x @ q^T) + bias), x bfloat16, q int8 per
// output channel, float32 sums, R the rounding to bfloat16. The layout, when it runs and the figures are in
// fovea/kernels/int8_linear.py.
//
// Each int8 is exact in bfloat16 (8 significant bits), so the products are those of the dequantized weight
// before its scale; the scale multiplies the float32 sum once per output. The weight is read once per call
// as a stream of 32-column panels; each 64-byte step (32 columns x 2 k, the pair order `vdpbf16ps` reads) is
// widened in registers by table look-up (`widen`): the weight is stored as sign-magnitude codes, and two
// 128-entry byte tables (`vpermt2b`) give each code's bfloat16 low and high bytes, interleaved into words. Up to
// kRows rows of x are accumulated in registers on that widened step; more rows (prefill) keep the widened panel
// in a per-thread buffer (L2) and run the next row blocks from it, so the weight is widened once per call and
// never written back to memory in full.
//
// How decode (1-6 rows, each panel streamed once from memory) reads the weight, per row count (AMD EPYC Zen 4,
// 1 thread timed by its CPU time, busy machine, 2026-12-07 16:56-17:26 UTC; a 1 GB stream of K = 896 panels on
// 2 MiB pages against an in-order byte sum over the same buffer, 5 interleaved runs, and benchmarks/gemv_ab.py):
// - 1 row (`Source::kOrderedStream`): the loads in address order (volatile asm, as bf16_linear.cpp's 1-4 row loop)
//   and one software prefetch per 256 bytes, 8 KB ahead: 95-116% of the sum's rate, where the loop before (the
//   compiler's load order and a prefetch per 64-byte line, 16 KB ahead) read 78-94%, in-order loads with no
//   software prefetch 88-100% (and ~0.6x the old loop in one gemv_ab run: the hardware prefetcher alone is not
//   robust to what the other processes do), in-order loads with a prefetch per line 75-93%. Widening and one row
//   consume ~40 GB/s with the weight in L2, well above memory.
// - 2 rows: bound by the core, not by the order of the loads: 10 zmm ops per 64-byte step (4 `vdpbf16ps` and 6
//   to widen), ~27 GB/s of int8 in L2, and 70-93% of the sum's rate from memory whatever the order or prefetch
//   (the loop below, `Source::kStream`, at the top of that range; in gemv_ab in-order loads were 0.86-0.88x it).
// - 3-6 rows: the software prefetch per line is what keeps the stream going: at 4 rows (~22 GB/s in L2) it read
//   67-85% of the sum's rate, in-order loads without it 44-59%, with one per 256 bytes no better: with fewer
//   bytes consumed per cycle the hardware prefetcher alone falls behind.
//
// Compiled on every x86-64 host: the functions carry a target attribute (as amx_linear.cpp does) and Python
// runs them only where the CPU reports avx512_bf16, avx512bw, avx512vbmi and avx512_vnni.
#include <ATen/Parallel.h>

#include <memory>
#include <type_traits>

#include "common.h"
#include "ops.h"

#if defined(__x86_64__) && (defined(__clang__) ? __clang_major__ >= 12 : (defined(__GNUC__) && __GNUC__ >= 11))
#define FOVEA_INT8 1
#include <immintrin.h>
#define FOVEA_INT8_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vnni,avx512vbmi")))
#endif

namespace fovea {

#ifdef FOVEA_INT8
namespace {

constexpr int kRows = 6;           // rows of x per register block: 6 x 2 x 2 sums + 2 weights + temps
constexpr int64_t kPanel = 32;     // output columns per panel (two zmm of 16 float32)
// bytes of the weight stream fetched ahead into L2 (decode reads it from DRAM), as the bfloat16 kernel does
constexpr int kPrefetchAhead = 16384;
// 1 row: one prefetch per 256 bytes of the in-order stream, this far ahead into L2 (8 KB read 3-6% more on average
// than 16 or 32 KB in the same 5 runs; the head of the file)
constexpr int kOrderedPrefetchAhead = 8192;

// The bfloat16 bytes of a magnitude m in 0..127: low byte = exponent's last bit and 7 mantissa bits, high byte =
// (sign and) exponent's first 7 bits. bf16(m) = 2^e (1 + f / 128), e = floor(log2 m): bits (127 + e) << 7 | f.
// Entry 0 holds -128's magnitude (bits 0x4300, low byte 0): code 0x80 is -128, and code 0 is masked to zero.
constexpr uint16_t magnitude_bits(int m) {
  if (m == 0) return 0x4300;
  int e = 0;
  while ((m >> (e + 1)) != 0) ++e;
  return static_cast<uint16_t>(((127 + e) << 7) | ((m << (7 - e)) & 0x7F));
}

template <int kHigh>
struct ByteTable {
  alignas(64) uint8_t bytes[128];
  constexpr ByteTable() : bytes() {
    for (int m = 0; m < 128; ++m) bytes[m] = static_cast<uint8_t>(kHigh ? magnitude_bits(m) >> 8 : magnitude_bits(m));
  }
};
constexpr ByteTable<0> kLowBytes;
constexpr ByteTable<1> kHighBytes;

struct Tables {
  __m512i low0, low1, high0, high1;
};

FOVEA_INT8_TARGET inline Tables load_tables() {
  return {_mm512_load_si512(kLowBytes.bytes), _mm512_load_si512(kLowBytes.bytes + 64),
          _mm512_load_si512(kHighBytes.bytes), _mm512_load_si512(kHighBytes.bytes + 64)};
}

// 64 codes of one panel step -> two vectors of 16 (k, k + 1) bfloat16 pairs (columns 0-15, 16-31), exact.
// A code is sign << 7 | |q| (0x80 is -128; `pack_weight`), its bytes placed so that the in-lane interleave of
// low and high bytes (vpunpck{l,h}bw) yields the columns in order. Five shuffles and a logic op where widening
// through int32 and float32 (vpmovsxbd, vcvtdq2ps, vcvtne2ps2bf16: ten) ran ~7x slower in L2 on Zen 4, slower
// than memory delivers int8 at one row.
FOVEA_INT8_TARGET inline void widen(__m512i codes, const Tables& t, __m512bh& lo, __m512bh& hi) {
  const __mmask64 nonzero = _mm512_test_epi8_mask(codes, codes);
  const __m512i low = _mm512_permutex2var_epi8(t.low0, codes, t.low1);  // the index's bit 7 is ignored
  __m512i high = _mm512_maskz_permutex2var_epi8(nonzero, t.high0, codes, t.high1);
  high = _mm512_ternarylogic_epi32(high, codes, _mm512_set1_epi8(static_cast<char>(0x80)), 0xF8);  // | sign
  lo = reinterpret_cast<__m512bh>(_mm512_unpacklo_epi8(low, high));
  hi = reinterpret_cast<__m512bh>(_mm512_unpackhi_epi8(low, high));
}

// The (x[k], x[k + 1]) pair of row r as one 32-bit lane, broadcast
FOVEA_INT8_TARGET inline __m512bh pair(const uint16_t* x, int64_t offset) {
  int32_t bits;
  std::memcpy(&bits, x + offset, sizeof(bits));
  return reinterpret_cast<__m512bh>(_mm512_set1_epi32(bits));
}

// One 64-byte step of codes, as a volatile asm: the compiler keeps volatile asms in program order, so the steps
// are loaded in address order (what the hardware prefetcher learns from: bf16_linear.cpp's `ordered_load`).
// The address goes in as a register, not as a memory operand: with a memory operand gcc took the asm for a
// reader of the sums too and stored every sum to the stack after each step (2R x 2 stores; at 4 rows the loop
// ran at half its rate with the weight in L2). The weight is never written while a kernel runs.
FOVEA_INT8_TARGET inline __m512i ordered_load(const int8_t* p) {
  __m512i v;
  asm volatile("vmovdqu64 (%1), %0" : "=v"(v) : "r"(p));
  return v;
}

// How `panel_block` gets each step's widened weights
enum class Source {
  kOrderedStream,   // widened from q, the loads in address order, a sparse software prefetch (1 row)
  kStream,          // widened from q, each line fetched kPrefetchAhead ahead into L2 by software (2-6 rows)
  kStreamAndKeep,   // as kStream, and the widened panel kept in buf for the row blocks after it
  kKept,            // read from buf
};

// Rows [0, R) of x (row stride ldx, K = 2 * pairs) times one widened step s (lo: columns 0-15, hi: 16-31)
template <int R>
FOVEA_INT8_TARGET inline void multiply_step(__m512bh lo, __m512bh hi, const uint16_t* x, int64_t ldx, int64_t s,
                                            __m512 (&acc)[R][2]) {
  for (int r = 0; r < R; ++r) {
    const __m512bh b = pair(x, r * ldx + 2 * s);
    acc[r][0] = _mm512_dpbf16_ps(acc[r][0], lo, b);
    acc[r][1] = _mm512_dpbf16_ps(acc[r][1], hi, b);
  }
}

template <int R, Source kSource>
FOVEA_INT8_TARGET inline void accumulate(const int8_t* q, const Tables& t, __m512bh* buf, const uint16_t* x,
                                         int64_t ldx, int64_t s, __m512 (&acc)[R][2]) {
  __m512bh lo, hi;
  if constexpr (kSource == Source::kKept) {
    lo = buf[2 * s];
    hi = buf[2 * s + 1];
  } else if constexpr (kSource == Source::kOrderedStream) {
    widen(ordered_load(q + 64 * s), t, lo, hi);
  } else {
    _mm_prefetch(reinterpret_cast<const char*>(q + 64 * s) + kPrefetchAhead, _MM_HINT_T1);
    widen(_mm512_loadu_si512(q + 64 * s), t, lo, hi);
    if constexpr (kSource == Source::kStreamAndKeep) {
      buf[2 * s] = lo;
      buf[2 * s + 1] = hi;
    }
  }
  multiply_step<R>(lo, hi, x, ldx, s, acc);
}

// Rows [0, R) of x against one panel, y = R(sum * scale + bias). Two sets of sums, even and odd k pairs, added at
// the end: a `vdpbf16ps` waits for the one before it on the same sum, and a single row has only two sums in
// flight. The same order for every R and every Source, so a row's result never depends on the rows around it.
template <int R, Source kSource>
FOVEA_INT8_TARGET void panel_block(const int8_t* q, __m512bh* buf, const uint16_t* x, int64_t ldx, int64_t pairs,
                                   const float* scale, const float* bias, int64_t cols, uint16_t* y, int64_t ldy) {
  const Tables t = load_tables();
  __m512 acc[R][2], odd[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = odd[r][0] = odd[r][1] = _mm512_setzero_ps();
  int64_t s = 0;
  if constexpr (kSource == Source::kOrderedStream) {
    for (; s + 3 < pairs; s += 4) {  // 256 bytes a round, loads in order, one prefetch
      _mm_prefetch(reinterpret_cast<const char*>(q + 64 * s) + kOrderedPrefetchAhead, _MM_HINT_T1);
      accumulate<R, kSource>(q, t, buf, x, ldx, s, acc);
      accumulate<R, kSource>(q, t, buf, x, ldx, s + 1, odd);
      accumulate<R, kSource>(q, t, buf, x, ldx, s + 2, acc);
      accumulate<R, kSource>(q, t, buf, x, ldx, s + 3, odd);
    }
  }
  for (; s + 1 < pairs; s += 2) {
    accumulate<R, kSource>(q, t, buf, x, ldx, s, acc);
    accumulate<R, kSource>(q, t, buf, x, ldx, s + 1, odd);
  }
  if (s < pairs) accumulate<R, kSource>(q, t, buf, x, ldx, s, acc);
  for (int r = 0; r < R; ++r) {
    acc[r][0] = _mm512_add_ps(acc[r][0], odd[r][0]);
    acc[r][1] = _mm512_add_ps(acc[r][1], odd[r][1]);
  }
  // y = R(sum * scale + bias), the columns past N masked off
  const __mmask16 m0 = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 m1 = cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1);
  const __m512 s0 = _mm512_maskz_loadu_ps(m0, scale), s1 = _mm512_maskz_loadu_ps(m1, scale + 16);
  const __m512 b0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
  const __m512 b1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) {
    // multiply, then add: two roundings, as torch's `y * scale + bias` in float32 would make
    const __m512 v0 = _mm512_add_ps(_mm512_mul_ps(acc[r][0], s0), b0);
    const __m512 v1 = _mm512_add_ps(_mm512_mul_ps(acc[r][1], s1), b1);
    _mm256_mask_storeu_epi16(y + r * ldy, m0, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v0)));
    _mm256_mask_storeu_epi16(y + r * ldy + 16, m1, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v1)));
  }
}

template <Source kSource>
FOVEA_INT8_TARGET void panel_rows(int rows, const int8_t* q, __m512bh* buf, const uint16_t* x, int64_t ldx,
                                  int64_t pairs, const float* scale, const float* bias, int64_t cols, uint16_t* y,
                                  int64_t ldy) {
#define FOVEA_INT8_CASE(R) \
  case R:                  \
    return panel_block<R, kSource>(q, buf, x, ldx, pairs, scale, bias, cols, y, ldy);
  switch (rows) {
    FOVEA_INT8_CASE(1)
    FOVEA_INT8_CASE(2)
    FOVEA_INT8_CASE(3)
    FOVEA_INT8_CASE(4)
    FOVEA_INT8_CASE(5)
    FOVEA_INT8_CASE(6)
  }
#undef FOVEA_INT8_CASE
}

// The decode path (M <= kRows: each panel streamed once from memory; the head of the file says why two loops)
FOVEA_INT8_TARGET void stream_panel(int rows, const int8_t* q, const uint16_t* x, int64_t ldx, int64_t pairs,
                                    const float* scale, const float* bias, int64_t cols, uint16_t* y, int64_t ldy) {
  if (rows == 1) {
    panel_block<1, Source::kOrderedStream>(q, nullptr, x, ldx, pairs, scale, bias, cols, y, ldy);
  } else {
    panel_rows<Source::kStream>(rows, q, nullptr, x, ldx, pairs, scale, bias, cols, y, ldy);
  }
}

// This thread's buffer for one widened panel (2 vectors per k pair, K * 64 bytes), kept between calls: a fresh
// one per call would be K * 64 bytes zeroed (and, past glibc's mmap threshold, page-faulted) for every layer.
FOVEA_INT8_TARGET __m512bh* panel_buffer(int64_t vectors) {
  thread_local std::unique_ptr<__m512bh[]> buffer;
  thread_local int64_t capacity = 0;
  if (vectors > capacity) {
    buffer.reset(new __m512bh[vectors]);  // uninitialised: every vector is written before it is read
    capacity = vectors;
  }
  return buffer.get();
}

// x [M, K] bfloat16 (K even, rows contiguous), packed [P, K / 2, 64] codes -> y [M, N] bfloat16
FOVEA_INT8_TARGET void run(const uint16_t* x, int64_t M, int64_t K, const int8_t* packed, int64_t N,
                           const float* scale, const float* bias, uint16_t* y) {
  const int64_t pairs = K / 2;
  const int64_t num_panels = (N + kPanel - 1) / kPanel;
  RangeSplit panels(num_panels, at::get_num_threads());  // each thread streams its own run of panels
  at::parallel_for(0, panels.num_ranges, 1, [&](int64_t begin, int64_t end) {
    __m512bh* buf = M > kRows ? panel_buffer(2 * pairs) : nullptr;
    for (int64_t range = begin; range < end; ++range) {
      for (int64_t p; panels.take(range, p);) {
        const int8_t* q = packed + p * pairs * 64;
        const int64_t n0 = p * kPanel, cols = std::min(kPanel, N - n0);
        const float* bp = bias ? bias + n0 : nullptr;
        for (int64_t m0 = 0; m0 < M; m0 += kRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kRows, M - m0));
          uint16_t* yr = y + m0 * N + n0;
          const uint16_t* xr = x + m0 * K;
          if (M <= kRows) {
            stream_panel(rows, q, xr, K, pairs, scale + n0, bp, cols, yr, N);
          } else if (m0 == 0) {
            panel_rows<Source::kStreamAndKeep>(rows, q, buf, xr, K, pairs, scale + n0, bp, cols, yr, N);
          } else {
            panel_rows<Source::kKept>(rows, q, buf, xr, K, pairs, scale + n0, bp, cols, yr, N);
          }
        }
      }
    }
  });
}

// ---- W8A8: int8 activations (quantized per row by the caller) x int8 weights, exact int32 sums (VNNI) ----------

// `vpdpbusd` multiplies unsigned by signed bytes, four per 32-bit lane: x is given as u = qx + 128 (qx ^ 0x80) and
// 128 * sum_k q[n, k] (`compensation`, made at packing) is taken off: sum u * q - 128 * sum q = sum qx * q, exact.
// Packed layout [P, K / 4, 32, 4]: a step is 128 bytes, columns 0-15 then 16-31, four k each.
template <int R>
FOVEA_INT8_TARGET inline void multiply_quads(__m512i lo, __m512i hi, const uint8_t* u, int64_t ldu, int64_t s,
                                             __m512i (&acc)[R][2]) {
  for (int r = 0; r < R; ++r) {
    int32_t bits;
    std::memcpy(&bits, u + r * ldu + 4 * s, sizeof(bits));
    const __m512i b = _mm512_set1_epi32(bits);
    acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], b, lo);
    acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], b, hi);
  }
}

// y = R(R(float(sum) * x_scale[m]) * scale[n]) (+ bias, rounded again): the roundings of
// `(acc.float() * x_scale.float() * scale.float()).to(dtype) + bias` (fovea.layers.quantization.int8).
// The steps are loaded in address order with one prefetch per 256 bytes, 8 KB ahead into L2, as the W8A16 1-row
// loop: 2R `vpdpbusd` per 128 bytes leave the core idle enough that the order of the loads sets the pace at
// every row count. Against the loop before (the compiler's order, 1 KB ahead into L1 every 256 bytes), 1 thread
// timed by its CPU time, benchmarks/gemv_ab.py --w8a8, busy AMD EPYC, 2026-12-07 17:44-17:51 UTC: 1.9-2.3x at
// 1, 2, 6, 8 and 13 rows, 1.5-1.9x at 4 (from ~11 to ~24 GB/s at 1 row). Two sets of sums (even and odd steps)
// as the W8A16 loop has; the integer sums are exact, so no order changes a bit.
template <int R, typename Out>
FOVEA_INT8_TARGET void quad_block(const int8_t* q, const uint8_t* u, int64_t ldu, int64_t quads,
                                  const int32_t* compensation, const float* x_scale, const float* scale,
                                  const float* bias, int64_t cols, Out* y, int64_t ldy) {
  __m512i acc[R][2], odd[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = odd[r][0] = odd[r][1] = _mm512_setzero_si512();
  int64_t s = 0;
  for (; s + 3 < quads; s += 4) {  // 512 bytes a round
    const char* step = reinterpret_cast<const char*>(q + 128 * s);
    _mm_prefetch(step + kOrderedPrefetchAhead, _MM_HINT_T1);
    _mm_prefetch(step + kOrderedPrefetchAhead + 256, _MM_HINT_T1);
    for (int j = 0; j < 4; ++j) {  // (a call's arguments may be evaluated in any order: gcc took hi first)
      const __m512i lo = ordered_load(q + 128 * (s + j));
      const __m512i hi = ordered_load(q + 128 * (s + j) + 64);
      multiply_quads<R>(lo, hi, u, ldu, s + j, j % 2 ? odd : acc);
    }
  }
  for (; s < quads; ++s) {
    const __m512i lo = ordered_load(q + 128 * s);
    const __m512i hi = ordered_load(q + 128 * s + 64);
    multiply_quads<R>(lo, hi, u, ldu, s, s % 2 ? odd : acc);
  }
  const __mmask16 m0 = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 m1 = cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1);
  const __m512i c0 = _mm512_maskz_loadu_epi32(m0, compensation);
  const __m512i c1 = _mm512_maskz_loadu_epi32(m1, compensation + 16);
  const __m512 s0 = _mm512_maskz_loadu_ps(m0, scale), s1 = _mm512_maskz_loadu_ps(m1, scale + 16);
  for (int r = 0; r < R; ++r) {
    const __m512 xs = _mm512_set1_ps(x_scale[r]);
    const __m512i sum0 = _mm512_sub_epi32(_mm512_add_epi32(acc[r][0], odd[r][0]), c0);
    const __m512i sum1 = _mm512_sub_epi32(_mm512_add_epi32(acc[r][1], odd[r][1]), c1);
    __m512 v0 = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sum0), xs), s0);
    __m512 v1 = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sum1), xs), s1);
    if constexpr (std::is_same_v<Out, float>) {
      if (bias) {
        v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, bias));
        v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, bias + 16));
      }
      _mm512_mask_storeu_ps(y + r * ldy, m0, v0);
      _mm512_mask_storeu_ps(y + r * ldy + 16, m1, v1);
    } else {
      __m256i h0 = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v0));
      __m256i h1 = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v1));
      if (bias) {  // the product rounded to bfloat16 first, then the sum: torch's two ops
        const __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h0), 16));
        const __m512 w1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h1), 16));
        h0 = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_add_ps(w0, _mm512_maskz_loadu_ps(m0, bias))));
        h1 = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_add_ps(w1, _mm512_maskz_loadu_ps(m1, bias + 16))));
      }
      _mm256_mask_storeu_epi16(y + r * ldy, m0, h0);
      _mm256_mask_storeu_epi16(y + r * ldy + 16, m1, h1);
    }
  }
}

// u [M, K4] uint8 (qx + 128, rows contiguous), packed [P, K4 / 4, 32, 4] -> y [M, N] float32 or bfloat16 bits
template <typename Out>
FOVEA_INT8_TARGET void run_quads(const uint8_t* u, int64_t M, int64_t K4, const int8_t* packed, int64_t N,
                                 const int32_t* compensation, const float* x_scale, const float* scale,
                                 const float* bias, Out* y) {
  const int64_t quads = K4 / 4;
  RangeSplit panels((N + kPanel - 1) / kPanel, at::get_num_threads());  // each thread streams its own run
  at::parallel_for(0, panels.num_ranges, 1, [&](int64_t begin, int64_t end) {
    for (int64_t range = begin; range < end; ++range) {
      for (int64_t p; panels.take(range, p);) {
        const int64_t n0 = p * kPanel, cols = std::min(kPanel, N - n0);
        const float* bp = bias ? bias + n0 : nullptr;
        const int8_t* q = packed + p * quads * 128;
        for (int64_t m0 = 0; m0 < M; m0 += kRows) {  // later row blocks read the panel (K / 4 x 128 B) from L2
#define FOVEA_QUAD_CASE(R)                                                                                  \
  case R:                                                                                                   \
    quad_block<R, Out>(q, u + m0 * K4, K4, quads, compensation + n0, x_scale + m0, scale + n0, bp, cols,    \
                       y + m0 * N + n0, N);                                                                 \
    break;
          switch (std::min<int64_t>(kRows, M - m0)) {
            FOVEA_QUAD_CASE(1)
            FOVEA_QUAD_CASE(2)
            FOVEA_QUAD_CASE(3)
            FOVEA_QUAD_CASE(4)
            FOVEA_QUAD_CASE(5)
            FOVEA_QUAD_CASE(6)
          }
#undef FOVEA_QUAD_CASE
        }
      }
    }
  });
}

}  // namespace
#endif

bool int8_linear_compiled() {
#ifdef FOVEA_INT8
  return true;
#else
  return false;
#endif
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias) {
#ifdef FOVEA_INT8
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int8_linear: x must be a [M, K] bfloat16 tensor, got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.size(2) == 2 * kPanel,
              "int8_linear: packed must be pack_weight's contiguous [N / 32, K / 2, 64] uint8 codes, got ",
              packed.scalar_type(), " ", packed.sizes());
  const int64_t M = x.size(0), N = out_features, K = 2 * packed.size(1);
  TORCH_CHECK(x.size(1) == K || x.size(1) + 1 == K, "int8_linear: x has K=", x.size(1), ", the packed weight ", K);
  TORCH_CHECK(N > 0 && N <= packed.size(0) * kPanel && N > (packed.size(0) - 1) * kPanel,
              "int8_linear: out_features=", N, " does not fit the packed weight's ", packed.size(0), " panels");
  TORCH_CHECK(scale.dim() == 1 && scale.numel() == N, "int8_linear: scale must be [", N, "], got ", scale.sizes());
  // an odd K: the packed weight has a zero column at k = K; x gets one too (never read past its row)
  const at::Tensor xc = x.size(1) == K ? x.contiguous() : at::constant_pad_nd(x, {0, 1}, 0);
  const at::Tensor sf = scale.to(at::kFloat).contiguous();
  at::Tensor bf;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == N, "int8_linear: bias must be [", N, "], got ", bias->sizes());
    bf = bias->to(at::kFloat).contiguous();
  }
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  run(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()), M, K,
      reinterpret_cast<const int8_t*>(packed.data_ptr<uint8_t>()), N,
      sf.data_ptr<float>(), bias.has_value() ? bf.data_ptr<float>() : nullptr,
      reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()));
  return y;
#else
  TORCH_CHECK(false, "int8_linear: not compiled on this host (needs x86-64 and gcc >= 11 or clang >= 12)");
#endif
}

at::Tensor int8_dynamic_linear(const at::Tensor& qx, const at::Tensor& x_scale, const at::Tensor& packed,
                               const at::Tensor& compensation, int64_t out_features, const at::Tensor& scale,
                               const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
#ifdef FOVEA_INT8
  TORCH_CHECK(qx.dim() == 2 && qx.scalar_type() == at::kChar, "int8_dynamic_linear: qx must be a [M, K] int8 tensor, got ",
              qx.scalar_type(), " ", qx.sizes());
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kChar && packed.is_contiguous() &&
                  packed.size(2) == kPanel && packed.size(3) == 4,
              "int8_dynamic_linear: packed must be a contiguous [N / 32, K / 4, 32, 4] int8 tensor, got ",
              packed.scalar_type(), " ", packed.sizes());
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16,
              "int8_dynamic_linear: out_dtype must be float32 or bfloat16, got ", out_dtype);
  const int64_t M = qx.size(0), K = qx.size(1), N = out_features, K4 = 4 * packed.size(1);
  TORCH_CHECK(K <= K4 && K > K4 - 4, "int8_dynamic_linear: qx has K=", K, ", the packed weight ", K4);
  TORCH_CHECK(N > 0 && N <= packed.size(0) * kPanel && N > (packed.size(0) - 1) * kPanel,
              "int8_dynamic_linear: out_features=", N, " does not fit the packed weight's ", packed.size(0),
              " panels");
  TORCH_CHECK(compensation.scalar_type() == at::kInt && compensation.numel() == N && compensation.is_contiguous(),
              "int8_dynamic_linear: compensation must be a contiguous [", N, "] int32 tensor");
  TORCH_CHECK(x_scale.numel() == M, "int8_dynamic_linear: x_scale must have M=", M, " values, got ", x_scale.numel());
  TORCH_CHECK(scale.dim() == 1 && scale.numel() == N, "int8_dynamic_linear: scale must be [", N, "], got ",
              scale.sizes());
  // u = qx + 128 as bytes, each row padded to K4 (the packed weight is zero there)
  at::Tensor u = at::full({M, K4}, 128, qx.options().dtype(at::kByte));
  u.narrow(1, 0, K).copy_(at::bitwise_xor(qx, -128).view(at::kByte));
  const at::Tensor xs = x_scale.to(at::kFloat).reshape({M}).contiguous();
  const at::Tensor sf = scale.to(at::kFloat).contiguous();
  at::Tensor bf;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == N, "int8_dynamic_linear: bias must be [", N, "], got ",
                bias->sizes());
    bf = bias->to(at::kFloat).contiguous();
  }
  const float* bias_ptr = bias.has_value() ? bf.data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({M, N}, qx.options().dtype(out_dtype));
  if (M == 0) return y;
  if (out_dtype == at::kFloat) {
    run_quads(u.data_ptr<uint8_t>(), M, K4, packed.data_ptr<int8_t>(), N, compensation.data_ptr<int32_t>(),
              xs.data_ptr<float>(), sf.data_ptr<float>(), bias_ptr, y.data_ptr<float>());
  } else {
    run_quads(u.data_ptr<uint8_t>(), M, K4, packed.data_ptr<int8_t>(), N, compensation.data_ptr<int32_t>(),
              xs.data_ptr<float>(), sf.data_ptr<float>(), bias_ptr,
              reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()));
  }
  return y;
#else
  TORCH_CHECK(false, "int8_dynamic_linear: not compiled on this host (needs x86-64 and gcc >= 11 or clang >= 12)");
#endif
}

}  // namespace fovea

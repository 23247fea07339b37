// bfloat16 linear on AVX-512 BF16 reading the weight as the checkpoint holds it: row-major W [N, K] (a read-only
// view of the mapped file), several such sources stacked along N. fovea/kernels/rows_linear.py says why.
//
// The arithmetic, the same bits on every path, row count and thread count: for output (m, n), S = ceil(K / 32),
//   acc (16 float32 lanes) = 0; acc = VDPBF16PS(acc, x[m, 32s:32s+32], W[n, 32s:32s+32]) for s = 0..S-1
//   (elements past K loaded as zeros: masked loads, so nothing past a row's end, or the mapping's, is touched),
//   y = tree(acc) + bias[n] in float32, rounded once to bfloat16 (nearest even).
// tree pairs lanes (l, l+8), then (l, l+4), (l, l+2), (l, l+1): `reduce16` does it for 16 outputs at once with
// shuffles, and both paths call it on the accumulators they stored, so decode and GEMM agree bit for bit (a row of
// x gets the same bits whatever else is in the call: batch invariance).
//
// Compiled on every x86-64 host, like bf16_linear.cpp: the functions carry a target attribute, Python runs them
// only where the CPU reports avx512_bf16.
#include <ATen/Parallel.h>

#include <new>
#include <vector>

#include "common.h"
#include "ops.h"

namespace fovea {

#ifdef FOVEA_AVX512_BF16
namespace {

constexpr int kMaxDecodeRows = 8;  // rows of x the decode path holds against one W row (one accumulator each)
constexpr int kPrefetchRows = 3;   // from this many rows of x the decode path prefetches its streams into L2
constexpr int kTileRows = 4;       // GEMM micro-tile: 4 rows of x x 6 rows of W, one zmm accumulator per output
constexpr int kTileCols = 6;
constexpr int64_t kBlockBytes = 256 << 10;  // a GEMM thread's block of W rows, kept in L2 (1 MiB on Zen 4)
// x past this many bytes (M x K x 2) is no longer held by L2 / L3 between blocks: every block of W re-reads it from
// memory, so the GEMM takes kBigBlockBytes of W per block (x read a sixth as often; W then comes from L3). Measured
// (1 thread, busy, same process alternating, 2026-12-07 20:58 UTC), rows / panel at 2048 rows, 256 KB -> 1.5 MB
// blocks: OPT q/k/v/o 0.81 -> 0.98, OPT fc2 (x 40 MB) 0.63 -> 0.94, Qwen down 0.87 -> 1.27; at 512 rows OPT fc2
// (x 10 MB) 0.66 -> 0.92; with x small the big blocks lose (16 rows 0.90 -> 0.76-0.83, 128 rows 0.95 -> 0.90).
constexpr int64_t kBigXBytes = 8 << 20;
constexpr int64_t kBigBlockBytes = 1536 << 10;

// 64-byte aligned storage for the blocked decode's x (its tiles use aligned loads)
struct AlignedDelete {
  void operator()(uint16_t* q) const { ::operator delete[](q, std::align_val_t{64}); }
};

// One source's place: rows [0, rows) of W at w + n * ld, written to output columns [col0, col0 + rows).
struct Source {
  const uint16_t* w;
  int64_t ld, rows, col0;
};

// A run of rows of one source: the unit a thread takes.
struct Item {
  int source;
  int64_t row0, rows;
};

// The call's operands.
struct Problem {
  const uint16_t* x;
  int64_t ldx, M, K, full;  // full: whole 32-wide steps; a tail step of K - 32 * full elements when tail != 0
  __mmask32 tail;
  const uint16_t* xb;  // the blocked decode's x: [steps][M][32], zeros past K
  const float* bias;  // [N] or nullptr
  uint16_t* y;        // [M, N]
  int64_t N;
  std::vector<Source> sources;
  std::vector<Item> items;
};

// A load the compiler keeps in program order (volatile asm): the W rows are read in address order, which is what
// the hardware prefetcher follows (bf16_linear.cpp's `ordered_load` says what reordering cost there).
FOVEA_BF16_TARGET inline __m512bh ordered_load(const uint16_t* p) {
  __m512i v;
  asm volatile("vmovdqu64 %1, %0" : "=v"(v) : "m"(*reinterpret_cast<const __m512i*>(p)));
  return (__m512bh)v;
}

// The tail step's load: elements past K are zeros and never read (a masked load does not fault on them).
FOVEA_BF16_TARGET inline __m512bh ordered_load_masked(const uint16_t* p, __mmask32 mask) {
  __m512i v;
  asm volatile("vmovdqu16 %1, %0%{%2%}%{z%}" : "=v"(v) : "m"(*reinterpret_cast<const __m512i*>(p)), "Yk"(mask));
  return (__m512bh)v;
}

FOVEA_BF16_TARGET inline __m512bh load_x(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
FOVEA_BF16_TARGET inline __m512bh load_x_masked(const uint16_t* p, __mmask32 mask) {
  return (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
}

// The input order that makes `reduce16`'s result come out in natural order: its last stage leaves output a[q] in
// lane 4 (q % 4) + q / 4, so lane j must hold a[4 (j % 4) + j / 4], the same transpose.
constexpr int kReduceOrder[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};

// Lane j of the result = tree(acc[j]) for the `count` (1..16) accumulators at acc (16 floats apart); the others 0.
// Every add is one pair of the fixed tree: (l, l+8) across 256-bit halves, (l, l+4) across 128-bit quarters, then
// (l, l+2) and (l, l+1) inside them. 15 adds and 30 shuffles for 16 outputs.
FOVEA_BF16_TARGET inline __m512 reduce16(const float* acc, int count) {
  __m512 a[16];
#pragma GCC unroll 16
  for (int q = 0; q < 16; ++q) {
    const int j = kReduceOrder[q];
    a[q] = j < count ? _mm512_loadu_ps(acc + 16 * j) : _mm512_setzero_ps();
  }
  __m512 b[8], c[4], d[2];
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {  // [a.lo256 + a.hi256, a'.lo256 + a'.hi256]
    b[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0xEE));
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {  // quarters 0 + 1 of each half: 4 outputs of 4 lanes each
    c[j] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0xDD));
  }
#pragma GCC unroll 2
  for (int j = 0; j < 2; ++j) {  // lanes (0, 2) and (1, 3) of each quarter
    d[j] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * j], c[2 * j + 1], 0x44),
                         _mm512_shuffle_ps(c[2 * j], c[2 * j + 1], 0xEE));
  }
  return _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xDD));
}

// y[0..count) = round(tree(acc[j]) + bias[j]): no bias, no add (so a -0 sum stays -0 on every path)
FOVEA_BF16_TARGET inline void write_outputs(const float* acc, int count, const float* bias, uint16_t* y) {
  __m512 sums = reduce16(acc, count);
  const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1);
  if (bias) sums = _mm512_add_ps(sums, _mm512_maskz_loadu_ps(mask, bias));
  _mm256_mask_storeu_epi16(y, mask, (__m256i)_mm512_cvtneps_pbh(sums));
}

// ---- decode: a few rows of x against each W row in turn, the W rows in address order ----------------------------

// The sums of the rows of x against `rows` W rows of each of kStreams streams (stream j's row r at w[j] + r * ldw):
// acc[(j * kMaxDecodeRows + m) * 256 + r * 16 ...]. The streams are contiguous runs of a thread's W rows, each
// read row after row in address order (volatile-asm loads: gcc keeps them in program order), their lines
// alternating: each x load feeds kStreams VDPBF16PS and each row of x has kStreams independent chains.
//
// Why streams (measured on the EPYC, 1 thread, rates per CPU second on a busy machine, 2026-12-07 17:03-17:37 UTC):
// one stream, one row after another, leaves one VDPBF16PS chain per output at 1 row of x (~6 cycles per 64 bytes);
// at K = 10240 (OPT's fc2: 320 dependent steps a row) the out-of-order window no longer overlaps two rows, and it
// read 0.46-0.52x what the panel kernel does; 2 streams 0.53-0.65x, 4 streams 0.90x. Reading rows n and n + 1
// interleaved line by line (adjacent rows, not two runs) read 12-22 GB/s where two runs read 26-35 (C loop): the
// prefetcher loses the rows. x's rows are read once per W line per stream, so more streams also cut x's traffic,
// which matters once x outgrows L1 (8 rows x K 10240 = 160 KB). From 3 rows of x a software prefetch 16 KB ahead
// of each stream into L2 (the loop issues fewer loads per cycle than the hardware prefetcher needs to run ahead:
// at 8 rows 0.45-0.65x the panel kernel without it, 0.45-0.96x with it); at 1-2 rows it read less.
template <int kRows, int kStreams>
FOVEA_BF16_TARGET void decode_rows(const Problem& p, const uint16_t* const* w, int64_t ldw, int rows, float* acc) {
  const uint16_t* x = p.x;
  const int64_t ldx = p.ldx;
  for (int r = 0; r < rows; ++r) {
    const uint16_t* row[kStreams];
#pragma GCC unroll 4
    for (int j = 0; j < kStreams; ++j) row[j] = w[j] + r * ldw;
    __m512 sum[kStreams][kRows];
#pragma GCC unroll 4
    for (int j = 0; j < kStreams; ++j) {
#pragma GCC unroll 8
      for (int m = 0; m < kRows; ++m) sum[j][m] = _mm512_setzero_ps();
    }
#pragma GCC unroll 2
    for (int64_t s = 0; s < p.full; ++s) {
      __m512bh b[kStreams];
#pragma GCC unroll 4
      for (int j = 0; j < kStreams; ++j) {
        if (kRows >= kPrefetchRows) {
          _mm_prefetch(reinterpret_cast<const char*>(row[j] + 32 * s) + kWeightPrefetchBytes, _MM_HINT_T1);
        }
        b[j] = ordered_load(row[j] + 32 * s);
      }
#pragma GCC unroll 8
      for (int m = 0; m < kRows; ++m) {
        const __m512bh xv = load_x(x + m * ldx + 32 * s);
#pragma GCC unroll 4
        for (int j = 0; j < kStreams; ++j) sum[j][m] = _mm512_dpbf16_ps(sum[j][m], xv, b[j]);
      }
    }
    if (p.tail) {
      __m512bh b[kStreams];
#pragma GCC unroll 4
      for (int j = 0; j < kStreams; ++j) b[j] = ordered_load_masked(row[j] + 32 * p.full, p.tail);
#pragma GCC unroll 8
      for (int m = 0; m < kRows; ++m) {
        const __m512bh xv = load_x_masked(x + m * ldx + 32 * p.full, p.tail);
#pragma GCC unroll 4
        for (int j = 0; j < kStreams; ++j) sum[j][m] = _mm512_dpbf16_ps(sum[j][m], xv, b[j]);
      }
    }
#pragma GCC unroll 4
    for (int j = 0; j < kStreams; ++j) {
#pragma GCC unroll 8
      for (int m = 0; m < kRows; ++m) _mm512_storeu_ps(acc + (j * kMaxDecodeRows + m) * 256 + r * 16, sum[j][m]);
    }
  }
}

using DecodeFn = void (*)(const Problem&, const uint16_t* const*, int64_t, int, float*);

template <int kStreams>
DecodeFn decode_fn(int64_t rows) {
  switch (rows) {
    case 1: return decode_rows<1, kStreams>;
    case 2: return decode_rows<2, kStreams>;
    case 3: return decode_rows<3, kStreams>;
    case 4: return decode_rows<4, kStreams>;
    case 5: return decode_rows<5, kStreams>;
    case 6: return decode_rows<6, kStreams>;
    case 7: return decode_rows<7, kStreams>;
    default: return decode_rows<8, kStreams>;
  }
}

// streams per row count: 4 up to 4 rows of x, 2 above (at most 16 accumulators)
int decode_streams(int64_t rows) { return rows <= 4 ? 4 : 2; }

// An item's rows as `streams` contiguous parts read side by side, 16 rows of each at a time, each group of outputs
// reduced and written as soon as it is summed; rows of the parts' uneven ends one part at a time.
FOVEA_BF16_TARGET void run_decode_item(const Problem& p, const Item& item) {
  alignas(64) float acc[4 * kMaxDecodeRows * 256];
  const Source& src = p.sources[item.source];
  const int streams = decode_streams(p.M);
  const DecodeFn fn = streams == 4 ? decode_fn<4>(p.M) : streams == 2 ? decode_fn<2>(p.M) : decode_fn<1>(p.M);
  const DecodeFn one = decode_fn<1>(p.M);
  const int64_t h = (item.rows + streams - 1) / streams;
  auto write = [&](const float* a, int64_t row, int count) {
    const int64_t col = src.col0 + row;
    for (int64_t m = 0; m < p.M; ++m) {
      write_outputs(a + m * 256, count, p.bias ? p.bias + col : nullptr, p.y + m * p.N + col);
    }
  };
  for (int64_t r0 = 0; r0 < h; r0 += 16) {
    int count[4];
    const uint16_t* w[4];
    for (int j = 0; j < streams; ++j) {
      const int64_t start = item.row0 + j * h + r0, end = item.row0 + std::min(item.rows, (j + 1) * h);
      count[j] = static_cast<int>(std::clamp<int64_t>(end - start, 0, 16));
      w[j] = src.w + start * src.ld;
    }
    const int common = count[streams - 1];  // the last part is the shortest
    if (common > 0) fn(p, w, src.ld, common, acc);
    for (int j = 0; j < streams; ++j) {
      for (int r = common; r < count[j]; ++r) {
        const uint16_t* single = w[j] + r * src.ld;
        one(p, &single, src.ld, 1, acc + j * kMaxDecodeRows * 256 + r * 16);
      }
      if (count[j] > 0) write(acc + j * kMaxDecodeRows * 256, item.row0 + j * h + r0, count[j]);
    }
  }
}

// ---- blocked decode: x past L1, K in chunks whose x stays there ----------------------------------------------------

// Where the decode above loses: from 8 rows of x the 2-stream loop loads 4 lines of x per W line, and once x outgrows
// L1 (8 rows x K 2560 = 40 KB) they come from L2: 0.40-0.47x the panel kernel on OPT-2.7b's shapes, 0.54x on
// Qwen2-0.5B's down projection (1 thread, busy, per CPU second, 2026-12-07 20:24 UTC). This path keeps x in L1 by
// cutting K into chunks of <= kChunkBytes of x: a tile (every row of x x NR W rows, one accumulator each) runs one
// chunk, stores its accumulators, and the next chunk reloads them (a float32 register stored and reloaded keeps its
// bits: the steps still go s = 0..S-1 per output). The W rows of a tile are then read a chunk at a time, not in
// address order, so the thread's W comes in blocks of ~kDecodeBlockBytes (an item) that sit in L2: while one block
// is computed, the next one is prefetched into L2 in address order, NR lines a step (the rate the tiles consume W),
// and each tile prefetches its own rows kL1PrefetchBytes ahead into L1. Measured (same process, alternating, 1
// thread, busy, 20:24 UTC): 8 rows 0.65-0.82x the panel kernel on OPT's shapes (the 2-stream loop 0.39-0.47x),
// 0.93x on Qwen's down (0.54x); with x in L1 anyway (Qwen's K = 896, OPT at <= 3 rows) the streams above read
// more (Qwen k/v 1.03-1.20x against 0.76-0.82x), hence the switch on x's bytes (kBlockedXBytes).
constexpr int64_t kBlockedXBytes = 16 << 10;      // decode rows x K x 2 above this: the blocked path ...
constexpr int64_t kBlockedMinRows = 5;            // ... from this many rows (2 threads, quiet, 21:25 UTC: at 4 rows
                                                  // the streams read 0.81-1.05x the panel kernel on OPT's shapes,
                                                  // blocked 0.79-1.02x; at 8 rows blocked 0.87-1.08x, streams 0.55-0.73x)
constexpr int64_t kChunkBytes = 16 << 10;         // x's bytes per K chunk (L1 is 32 KB; 20-28 KB measured no better)
constexpr int64_t kDecodeBlockBytes = 256 << 10;  // W per item (128 KB: 0.66-0.78x at 8 rows on OPT, 256 KB 0.71-0.82x)
constexpr int kL1PrefetchBytes = 1024;            // a tile's W rows ahead into L1 (none: 4 rows 0.74x, 1 KB 0.96-1.05x)

// W rows per tile for MR rows of x: MR x NR accumulators + NR W lines + 1 x line within the 32 zmm registers
constexpr int blocked_cols(int mr) { return mr >= 7 ? 3 : mr == 6 ? 4 : 5; }

// acc[m * lda + j * 16 ...] = the 16-lane sums of x row m . W row j after steps [0, s1), continued from the stored
// ones over steps [s0, s1) (s0 == 0: from zero; s1 > p.full: the tail step last). xb: x laid out [step][MR][32],
// zeros past K (one stream of aligned loads; the zeros are what the masked loads give). `pf`: the next block's
// address-order prefetch cursor, NR lines a step, held at `pf_last`. W's loads are volatile asm (`ordered_load`):
// left to itself gcc reloaded each W line for every row of x (24 loads a step instead of 6 at 4 rows) to free
// registers, which left the loop load-bound (4 rows, W in L2: 26 GB/s, one load a line: 33).
template <int MR, int NR>
FOVEA_BF16_TARGET void blocked_tile(const Problem& p, const uint16_t* xb, const uint16_t* w, int64_t ldw, int64_t s0,
                                    int64_t s1, float* acc, int64_t lda, const char*& pf, const char* pf_last) {
  __m512 sum[MR][NR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) sum[m][j] = s0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + m * lda + j * 16);
  }
  const char* ahead = pf;
  const int64_t full_end = std::min(s1, p.full);
  const uint16_t* xs = xb + s0 * MR * 32;
  const uint16_t* ws = w + 32 * s0;
  for (int64_t s = s0; s < full_end; ++s, xs += MR * 32, ws += 32) {
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) {
      _mm_prefetch(ahead, _MM_HINT_T1);
      ahead = ahead < pf_last ? ahead + 64 : ahead;
      _mm_prefetch(reinterpret_cast<const char*>(ws + j * ldw) + kL1PrefetchBytes, _MM_HINT_T0);
    }
    __m512bh b[NR];
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) b[j] = ordered_load(ws + j * ldw);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512bh xv = (__m512bh)_mm512_load_si512(xs + m * 32);
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) sum[m][j] = _mm512_dpbf16_ps(sum[m][j], xv, b[j]);
    }
  }
  if (s1 > p.full) {
    __m512bh b[NR];
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) b[j] = ordered_load_masked(w + j * ldw + 32 * p.full, p.tail);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512bh xv = (__m512bh)_mm512_load_si512(xb + (p.full * MR + m) * 32);
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) sum[m][j] = _mm512_dpbf16_ps(sum[m][j], xv, b[j]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) _mm512_storeu_ps(acc + m * lda + j * 16, sum[m][j]);
  }
  pf = ahead;
}

using BlockedFn = void (*)(const Problem&, const uint16_t*, const uint16_t*, int64_t, int64_t, int64_t, float*,
                           int64_t, const char*&, const char*);

template <int MR>
BlockedFn blocked_fn_rows(bool whole) {
  return whole ? blocked_tile<MR, blocked_cols(MR)> : blocked_tile<MR, 1>;
}

// whole: the tile of blocked_cols(M) W rows; else one W row (a source's last rows)
BlockedFn blocked_fn(int64_t rows, bool whole) {
  switch (rows) {  // kBlockedMinRows..kMaxDecodeRows
    case 5: return blocked_fn_rows<5>(whole);
    case 6: return blocked_fn_rows<6>(whole);
    case 7: return blocked_fn_rows<7>(whole);
    default: return blocked_fn_rows<8>(whole);
  }
}

// K's steps in chunks of <= kChunkBytes of x, as even as they come: chunk steps
int64_t blocked_chunk_steps(int64_t M, int64_t steps) {
  const int64_t most = std::max<int64_t>(1, kChunkBytes / (64 * M));
  const int64_t count = (steps + most - 1) / most;
  return (steps + count - 1) / count;
}

// An item (a block of W rows, a multiple of the tile's rows but at a source's end) against every row of x: chunk by
// chunk, tile by tile; then each row's outputs reduced and written. acc holds [M][block rows][16].
FOVEA_BF16_TARGET void run_blocked_item(const Problem& p, const Item& item, std::vector<float>& acc) {
  const Source& src = p.sources[item.source];
  const int64_t rows = item.rows, lda = rows * 16;
  acc.resize(static_cast<size_t>(p.M * lda));
  const uint16_t* w = src.w + item.row0 * src.ld;
  const int64_t col0 = src.col0 + item.row0;
  const int nr = blocked_cols(static_cast<int>(p.M));
  const BlockedFn whole = blocked_fn(p.M, true), single = blocked_fn(p.M, false);
  const int64_t steps = p.full + (p.tail ? 1 : 0), chunk = blocked_chunk_steps(p.M, steps);
  // the source's next block (this thread's next item, as a rule), fetched into L2 in address order meanwhile
  const int64_t next_rows = std::min(rows, src.rows - item.row0 - rows);
  const char* pf = reinterpret_cast<const char*>(w + rows * src.ld);
  const char* pf_last = next_rows > 0 ? pf + ((next_rows - 1) * src.ld + p.K - 1) * 2 / 64 * 64 : pf;
  for (int64_t s0 = 0; s0 < steps; s0 += chunk) {
    const int64_t s1 = std::min(steps, s0 + chunk);
    int64_t j = 0;
    for (; j + nr <= rows; j += nr) whole(p, p.xb, w + j * src.ld, src.ld, s0, s1, acc.data() + j * 16, lda, pf, pf_last);
    for (; j < rows; ++j) single(p, p.xb, w + j * src.ld, src.ld, s0, s1, acc.data() + j * 16, lda, pf, pf_last);
  }
  for (int64_t m = 0; m < p.M; ++m) {
    for (int64_t j0 = 0; j0 < rows; j0 += 16) {
      const int count = static_cast<int>(std::min<int64_t>(16, rows - j0));
      write_outputs(acc.data() + m * lda + j0 * 16, count, p.bias ? p.bias + col0 + j0 : nullptr,
                    p.y + m * p.N + col0 + j0);
    }
  }
}

// x as the blocked tiles read it: [step][M][32], zeros past K
void lay_out_x(const Problem& p, uint16_t* xb) {
  const int64_t steps = p.full + (p.tail ? 1 : 0);
  for (int64_t s = 0; s < steps; ++s) {
    for (int64_t m = 0; m < p.M; ++m) {
      uint16_t* dst = xb + (s * p.M + m) * 32;
      const int64_t count = std::min<int64_t>(32, p.K - 32 * s);
      std::memcpy(dst, p.x + m * p.ldx + 32 * s, count * 2);
      std::memset(dst + count, 0, (32 - count) * 2);
    }
  }
}

// ---- GEMM: kTileRows x kTileCols micro-tiles over a block of W rows held in L2 ------------------------------------

// acc[i * ld + j * 16 ...] = the 16-lane sums of x row i . W row j for an MR x NR tile: per 32-wide step, MR loads
// of x, NR of W, MR * NR VDPBF16PS (24 for 4 x 6: the core's one per cycle, 10 loads beside them).
template <int MR, int NR>
FOVEA_BF16_TARGET void tile(const Problem& p, const uint16_t* x, const uint16_t* w, int64_t ldw, float* acc,
                            int64_t ld, const char* pf, int64_t pf_lines) {
  __m512 sum[MR][NR];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 6
    for (int j = 0; j < NR; ++j) sum[i][j] = _mm512_setzero_ps();
  }
  const int64_t ldx = p.ldx;
  // pf_lines of the next block spread over the steps, in address order (a burst before the tile overflowed the
  // prefetch queue)
  const int64_t per_step = p.full > 0 ? (pf_lines + p.full - 1) / p.full : 0;
  int64_t done = 0;
  for (int64_t s = 0; s < p.full; ++s) {
    for (const int64_t end = std::min(pf_lines, done + per_step); done < end; ++done) {
      _mm_prefetch(pf + 64 * done, _MM_HINT_T1);
    }
    __m512bh a[MR];
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) a[i] = load_x(x + i * ldx + 32 * s);
#pragma GCC unroll 6
    for (int j = 0; j < NR; ++j) {
      const __m512bh b = load_x(w + j * ldw + 32 * s);
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) sum[i][j] = _mm512_dpbf16_ps(sum[i][j], a[i], b);
    }
  }
  if (p.tail) {
    __m512bh a[MR];
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) a[i] = load_x_masked(x + i * ldx + 32 * p.full, p.tail);
#pragma GCC unroll 6
    for (int j = 0; j < NR; ++j) {
      const __m512bh b = load_x_masked(w + j * ldw + 32 * p.full, p.tail);
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) sum[i][j] = _mm512_dpbf16_ps(sum[i][j], a[i], b);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 6
    for (int j = 0; j < NR; ++j) _mm512_storeu_ps(acc + i * ld + j * 16, sum[i][j]);
  }
  for (; done < pf_lines; ++done) _mm_prefetch(pf + 64 * done, _MM_HINT_T1);
}

using TileFn = void (*)(const Problem&, const uint16_t*, const uint16_t*, int64_t, float*, int64_t, const char*,
                        int64_t);

template <int MR>
TileFn tile_fn_cols(int nr) {
  switch (nr) {
    case 1: return tile<MR, 1>;
    case 2: return tile<MR, 2>;
    case 3: return tile<MR, 3>;
    case 4: return tile<MR, 4>;
    case 5: return tile<MR, 5>;
    default: return tile<MR, 6>;
  }
}

TileFn tile_fn(int mr, int nr) {
  switch (mr) {
    case 1: return tile_fn_cols<1>(nr);
    case 2: return tile_fn_cols<2>(nr);
    case 3: return tile_fn_cols<3>(nr);
    default: return tile_fn_cols<4>(nr);
  }
}

// One block of W rows (an item) against every row of x, 4 rows of x at a time; acc holds [4][block rows][16].
FOVEA_BF16_TARGET void run_gemm_item(const Problem& p, const Item& item, std::vector<float>& acc) {
  const Source& src = p.sources[item.source];
  const int64_t ld = item.rows * 16;
  acc.resize(static_cast<size_t>(kTileRows * ld));
  const uint16_t* w = src.w + item.row0 * src.ld;
  const int64_t col0 = src.col0 + item.row0;
  // the source's next block (this thread's next item, as a rule) fetched into L2 in address order, a share of it
  // before every tile of this one
  const int64_t next_rows = std::min(item.rows, src.rows - item.row0 - item.rows);
  const char* next = reinterpret_cast<const char*>(w + item.rows * src.ld);
  const int64_t next_lines = next_rows > 0 ? ((next_rows - 1) * src.ld + p.K) * 2 / 64 + 1 : 0;
  const int64_t num_tiles = (p.M + kTileRows - 1) / kTileRows * ((item.rows + kTileCols - 1) / kTileCols);
  const int64_t lines_per_tile = (next_lines + num_tiles - 1) / num_tiles;
  int64_t line = 0;
  for (int64_t m0 = 0; m0 < p.M; m0 += kTileRows) {
    const int mr = static_cast<int>(std::min<int64_t>(kTileRows, p.M - m0));
    const uint16_t* x = p.x + m0 * p.ldx;
    for (int64_t j0 = 0; j0 < item.rows; j0 += kTileCols) {
      const int64_t count = std::max<int64_t>(0, std::min(next_lines, line + lines_per_tile) - line);
      const int nr = static_cast<int>(std::min<int64_t>(kTileCols, item.rows - j0));
      tile_fn(mr, nr)(p, x, w + j0 * src.ld, src.ld, acc.data() + j0 * 16, ld, next + 64 * line, count);
      line += count;
    }
    for (int i = 0; i < mr; ++i) {
      for (int64_t j0 = 0; j0 < item.rows; j0 += 16) {
        const int count = static_cast<int>(std::min<int64_t>(16, item.rows - j0));
        write_outputs(acc.data() + i * ld + j0 * 16, count, p.bias ? p.bias + col0 + j0 : nullptr,
                      p.y + (m0 + i) * p.N + col0 + j0);
      }
    }
  }
}

// Each source cut into items of `item_rows` rows (the last shorter), in the sources' order.
std::vector<Item> make_items(const std::vector<Source>& sources, int64_t item_rows) {
  std::vector<Item> items;
  for (size_t i = 0; i < sources.size(); ++i) {
    for (int64_t r = 0; r < sources[i].rows; r += item_rows) {
      items.push_back({static_cast<int>(i), r, std::min(item_rows, sources[i].rows - r)});
    }
  }
  return items;
}

}  // namespace

bool rows_linear_compiled() { return true; }

at::Tensor rows_linear(const at::Tensor& x, const std::vector<at::Tensor>& sources, int64_t out_features,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu() && x.stride(1) == 1,
              "x must be a CPU bfloat16 [M, K] tensor with contiguous rows (stride(1) == 1); got ", x.scalar_type(),
              " ", x.sizes(), " strides ", x.strides());
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  TORCH_CHECK(K >= 1, "x has no columns (K = 0); the kernel needs K >= 1");
  TORCH_CHECK(!sources.empty(), "sources is empty: give the weight's row-major [n_i, K] pieces, at least one");
  Problem p;
  int64_t col = 0;
  for (size_t i = 0; i < sources.size(); ++i) {
    const at::Tensor& s = sources[i];
    TORCH_CHECK(s.dim() == 2 && s.scalar_type() == at::kBFloat16 && s.device().is_cpu(),
                "sources[", i, "] must be a CPU bfloat16 [n, K] tensor; got ", s.scalar_type(), " ", s.sizes());
    TORCH_CHECK(s.size(1) == K, "sources[", i, "] has ", s.size(1), " columns; x has K = ", K);
    TORCH_CHECK(s.stride(1) == 1 && (s.size(0) <= 1 || s.stride(0) >= K), "sources[", i,
                "] must have contiguous rows (stride(1) == 1) at least K apart (stride(0) >= K); got strides ",
                s.strides());
    p.sources.push_back({reinterpret_cast<const uint16_t*>(s.data_ptr<at::BFloat16>()),
                         s.size(0) <= 1 ? K : s.stride(0), s.size(0), col});
    col += s.size(0);
  }
  TORCH_CHECK(col == N, "the sources have ", col, " rows in all; out_features is ", N);
  p.bias = nullptr;
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->stride(0) == 1 &&
                bias->scalar_type() == at::kFloat && bias->device().is_cpu(),
                "bias must be a contiguous CPU float32 [", N, "] tensor or None; got ", bias->scalar_type(), " ",
                bias->sizes());
    p.bias = bias->data_ptr<float>();
  }
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  p.x = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  p.ldx = M == 1 ? K : x.stride(0);
  p.M = M;
  p.K = K;
  p.full = K / 32;
  p.tail = static_cast<__mmask32>((1ull << (K % 32)) - 1);
  p.y = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  p.N = N;
  const int64_t threads = at::get_num_threads();
  const bool decode = M <= kMaxDecodeRows;
  const bool blocked = decode && M >= kBlockedMinRows && M * K * 2 > kBlockedXBytes;
  int64_t item_rows;
  if (blocked) {
    // blocks of whole tiles, ~kDecodeBlockBytes of W, at least 4 per thread where N allows
    const int64_t nr = blocked_cols(static_cast<int>(M));
    item_rows = std::max<int64_t>(nr, kDecodeBlockBytes / (2 * K) / nr * nr);
    item_rows = std::min(item_rows, std::max<int64_t>(nr, N / (4 * threads) / nr * nr));
  } else if (decode) {
    // runs of whole 16-row groups, ~128 KB of W each, at least 4 per thread where N allows (a fast thread takes
    // over a slow one's)
    item_rows = std::max<int64_t>(64, ((256 << 10) / (2 * K)) & ~int64_t{63});
    item_rows = std::min(item_rows, std::max<int64_t>(64, (N / (4 * threads)) & ~int64_t{63}));
  } else {
    // blocks of whole tiles that stay in L2 while every row of x passes them, at least 2 per thread where N allows
    const int64_t block_bytes = M * K * 2 > kBigXBytes ? kBigBlockBytes : kBlockBytes;
    item_rows = std::max<int64_t>(kTileCols, block_bytes / (2 * K) / kTileCols * kTileCols);
    item_rows = std::min(item_rows, std::max<int64_t>(kTileCols, N / (2 * threads) / kTileCols * kTileCols));
  }
  p.items = make_items(p.sources, item_rows);
  std::unique_ptr<uint16_t[], AlignedDelete> xb;  // blocked: x laid out once for every thread
  if (blocked) {
    xb.reset(new (std::align_val_t{64}) uint16_t[(p.full + 1) * M * 32]);
    lay_out_x(p, xb.get());
  }
  p.xb = xb.get();
  RangeSplit items(static_cast<int64_t>(p.items.size()), threads);
  at::parallel_for(0, items.num_ranges, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc;
    for (int64_t range = begin; range < end; ++range) {
      for (int64_t i; items.take(range, i);) {
        if (blocked) {
          run_blocked_item(p, p.items[i], acc);
        } else if (decode) {
          run_decode_item(p, p.items[i]);
        } else {
          run_gemm_item(p, p.items[i], acc);
        }
      }
    }
  });
  return y;
}

#else  // no AVX-512 BF16 code from this compiler or on this architecture: Python sees rows_linear_compiled() false

bool rows_linear_compiled() { return false; }
at::Tensor rows_linear(const at::Tensor&, const std::vector<at::Tensor>&, int64_t, const std::optional<at::Tensor>&) {
  TORCH_CHECK(false, "fovea's row-major AVX-512 BF16 linear kernel was not compiled (x86-64 with gcc >= 10 or "
                     "clang >= 9)");
}

#endif

}  // namespace fovea

// Attention over variable-length segments on AVX-512 BF16, bidirectional (encoders) or causal (a decoder's prefill,
// aligned bottom-right), with as many kv heads as q heads or fewer (grouped-query): flash attention with VDPBF16PS
// products, float32 scores and an online softmax over key blocks, the probabilities rounded to bfloat16 for P @ V
// (as torch's CPU flash kernel rounds them), the output rounded once. fovea/kernels/encoder_attention.py says why
// and what it matches.
//
// Compiled on every x86-64 host, like bf16_linear.cpp: Python runs it only where the CPU reports avx512_bf16.
#include <ATen/Parallel.h>

#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "common.h"
#include "ops.h"

#if defined(__x86_64__) && (defined(__clang__) ? __clang_major__ >= 9 : (defined(__GNUC__) && __GNUC__ >= 10))
#define FOVEA_ENCODER_BF16 1
#include <immintrin.h>
#define FOVEA_ATTN_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#endif

namespace fovea {

#ifdef FOVEA_ENCODER_BF16
namespace {

constexpr int kBlockRows = 12;    // query rows per block: 12 x 2 accumulators of 16 keys in `scores_tile`
constexpr int kKeyBlock = 256;    // keys per online-softmax step (a multiple of 32): S, P and O stay in L1

inline int32_t pair_at(const uint16_t* p) {  // two bfloat16 as one 32-bit lane
  int32_t pair;
  std::memcpy(&pair, p, sizeof(pair));
  return pair;
}

// S[m][0..31] = q_m . k_t for 32 keys (two panels of 16): `kp` holds a panel's keys pair-major ([D/2][16 keys][2]),
// so q's pair (2r, 2r + 1), broadcast, meets one 64-byte row of 16 keys; float32 sums in pair order. Row m's
// lane-wise maximum over its first min(valid, first + m) keys goes into vmax[m] (16 lanes), so the softmax needs no
// pass for it (`first`: row 0's visible keys in this tile under a causal mask, one more per row; a large number
// when nothing is masked).
template <int kRows>
FOVEA_ATTN_TARGET void scores_tile(const uint16_t* q, int64_t ldq, const uint16_t* kp, int64_t pairs, float* s,
                                   int64_t lds, int valid, int first, float* vmax) {
  __m512 acc[kRows][2];
  for (int m = 0; m < kRows; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  const uint16_t* kp1 = kp + pairs * 32;
  for (int64_t r = 0; r < pairs; ++r) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(kp + r * 32);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(kp1 + r * 32);
#pragma GCC unroll 12
    for (int m = 0; m < kRows; ++m) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(pair_at(q + m * ldq + 2 * r));
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], x, b0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], x, b1);
    }
  }
  if (valid >= 32 && first >= 32) {
    for (int m = 0; m < kRows; ++m) {
      _mm512_storeu_ps(s + m * lds, acc[m][0]);
      _mm512_storeu_ps(s + m * lds + 16, acc[m][1]);
      _mm512_storeu_ps(vmax + 16 * m, _mm512_max_ps(_mm512_loadu_ps(vmax + 16 * m),
                                                    _mm512_max_ps(acc[m][0], acc[m][1])));
    }
    return;
  }
  for (int m = 0; m < kRows; ++m) {
    const int n = std::max(0, std::min(valid, first + m));  // this row's keys in the tile
    const __mmask16 m0 = n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
    const __mmask16 m1 = n > 16 ? static_cast<__mmask16>((1u << (n - 16)) - 1) : 0;
    _mm512_storeu_ps(s + m * lds, acc[m][0]);
    _mm512_storeu_ps(s + m * lds + 16, acc[m][1]);
    __m512 v = _mm512_loadu_ps(vmax + 16 * m);
    v = _mm512_mask_max_ps(v, m0, v, acc[m][0]);
    _mm512_storeu_ps(vmax + 16 * m, _mm512_mask_max_ps(v, m1, v, acc[m][1]));
  }
}

// O[m][16 c .. 16 c + 15] = alpha_m O[m][..] + sum_j P[m][j] V[j][..] for kChunks chunks of 16 columns: `vp` holds
// the values key-pair-major ([keys/2][D'][2], D' the head size padded to 16), so P's pair (2j, 2j + 1) of a row,
// broadcast, meets one 64-byte row of 16 columns x 2 keys.
template <int kRows, int kChunks>
FOVEA_ATTN_TARGET void values_tile(const uint16_t* p, int64_t ldp, const uint16_t* vp, int64_t ldv, int64_t key_pairs,
                                   float* o, int64_t ldo, const float* alpha) {
  __m512 acc[kRows][kChunks];
  for (int m = 0; m < kRows; ++m) {
    const __m512 a = _mm512_set1_ps(alpha[m]);
    for (int c = 0; c < kChunks; ++c) acc[m][c] = _mm512_mul_ps(_mm512_loadu_ps(o + m * ldo + 16 * c), a);
  }
  for (int64_t j = 0; j < key_pairs; ++j) {
    __m512bh b[kChunks];
    for (int c = 0; c < kChunks; ++c) b[c] = (__m512bh)_mm512_loadu_si512(vp + j * ldv + 32 * c);
#pragma GCC unroll 12
    for (int m = 0; m < kRows; ++m) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(pair_at(p + m * ldp + 2 * j));
      for (int c = 0; c < kChunks; ++c) acc[m][c] = _mm512_dpbf16_ps(acc[m][c], x, b[c]);
    }
  }
  for (int m = 0; m < kRows; ++m) {
    for (int c = 0; c < kChunks; ++c) _mm512_storeu_ps(o + m * ldo + 16 * c, acc[m][c]);
  }
}

using ScoresFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, float*, int64_t, int, int, float*);
using ValuesFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, float*, int64_t, const float*);

template <int... kRows>
ScoresFn pick_scores(int rows, std::integer_sequence<int, kRows...>) {
  ScoresFn fn = nullptr;
  ((rows == kRows + 1 ? (fn = scores_tile<kRows + 1>, 0) : 0), ...);
  return fn;
}

// values tiles keep rows x chunks <= 24 accumulators (of 32 registers)
constexpr int values_rows(int chunks) { return chunks <= 2 ? 12 : chunks == 3 ? 8 : 6; }

template <int kChunks, int... kRows>
ValuesFn pick_values(int rows, std::integer_sequence<int, kRows...>) {
  ValuesFn fn = nullptr;
  ((rows == kRows + 1 ? (fn = values_tile<kRows + 1, kChunks>, 0) : 0), ...);
  return fn;
}

ValuesFn values_fn(int rows, int chunks) {
  switch (chunks) {
    case 1: return pick_values<1>(rows, std::make_integer_sequence<int, values_rows(1)>{});
    case 2: return pick_values<2>(rows, std::make_integer_sequence<int, values_rows(2)>{});
    case 3: return pick_values<3>(rows, std::make_integer_sequence<int, values_rows(3)>{});
    default: return pick_values<4>(rows, std::make_integer_sequence<int, values_rows(4)>{});
  }
}

// exp(x) for x <= 0 on 16 lanes: exp_approx's (common.h) Cephes polynomial with FMAs, 2^n by VSCALEFPS, which
// needs no clamp (x below ~-104 gives 0, as exp's float32 result underflows)
FOVEA_ATTN_TARGET inline __m512 exp16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f),
                                   _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// One key block of one query row: s[0..nb) raw scores of which the first `valid` are keys, vmax their lane-wise
// maximum. The block's max, scaled, joins the row's running max `mx`; P = bf16(exp(s * scale - max)) (zeros past
// `valid`); the unrounded exps join the running sum `l` (torch's order: l = block sum + exp(old max - max) * l).
// Returns exp(old max - max), the factor the row's output is rescaled by. (A positive scale keeps the max's place:
// max(s) * scale is max(s * scale), bit for bit.)
FOVEA_ATTN_TARGET float softmax_block(const float* s, const float* vmax, int64_t nb, int64_t valid, float scale,
                                      float& mx, float& l, uint16_t* p) {
  const float new_max = std::max(mx, _mm512_reduce_max_ps(_mm512_loadu_ps(vmax)) * scale);
  const float alpha = mx == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(mx - new_max);
  const __m512 vm = _mm512_set1_ps(new_max), sc = _mm512_set1_ps(scale);
  __m512 vsum = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= valid; j += 16) {
    const __m512 e = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), sc, vm));
    vsum = _mm512_add_ps(vsum, e);
    // VCVTNEPS2BF16 rounds to nearest even, as c10's conversion
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), (__m256i)_mm512_cvtneps_pbh(e));
  }
  for (; j < nb; j += 16) {
    const __mmask16 real = valid > j ? static_cast<__mmask16>((1u << (valid - j)) - 1) : 0;
    const __m512 e = _mm512_maskz_mov_ps(real, exp16(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), sc, vm)));
    vsum = _mm512_add_ps(vsum, e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), (__m256i)_mm512_cvtneps_pbh(e));
  }
  l = _mm512_reduce_add_ps(vsum) + alpha * l;
  mx = new_max;
  return alpha;
}

struct Problem {
  const uint16_t *q, *k, *v;
  int64_t q_row, q_head, k_row, k_head, v_row, v_head;  // strides in elements
  const int64_t *cu_q, *cu_k;
  int64_t heads, kv_heads, D, dpad;  // dpad: D rounded up to 16 (the values' packed row)
  float scale;
  bool causal;  // query row i of a segment of n_q rows over n_k keys sees keys j <= i + n_k - n_q
  uint16_t* out;  // [Nq, heads, D]
  // every (segment, kv head)'s keys and values as the tiles read them: segment s's panels start at row
  // key_base[s] * kv_heads + h * padded(s) of kp ([rows][D]) and vp ([rows][dpad]), padded(s) = its keys rounded to 32
  uint16_t *kp, *vp;
  const int64_t* key_base;
};

inline int64_t padded_keys(int64_t L) { return (L + 31) / 32 * 32; }

// One work item: (segment, kv head) `pack`'s keys and values packed (head < 0), or its q head `head`'s query rows
// block .. block + 11
struct Item {
  int64_t pack, head, block;
};

// Per thread: one query block's S, P, O.
struct Scratch {
  std::vector<uint16_t> p;
  std::vector<float> s, vmax, o, mx, l, alpha;
};

// Keys [L, D] into panels of 16 keys, pair-major: kp[((t / 16) * D/2 + r) * 32 + (t % 16) * 2 + e] = k[t][2r + e];
// values into key pairs: vp[((t / 2) * D' + d) * 2 + t % 2] = v[t][d]. Zeros past L (up to `padded`) and past D.
// A head's rows lie a packed projection's row apart (kilobytes), so they are fetched kPackAhead rows ahead.
constexpr int kPackAhead = 8;

FOVEA_ATTN_TARGET void prefetch_row(const uint16_t* row, int64_t D) {
  for (int64_t b = 0; b < D * 2; b += 64) _mm_prefetch(reinterpret_cast<const char*>(row) + b, _MM_HINT_T0);
}

FOVEA_ATTN_TARGET void pack_keys_values(const Problem& pr, int64_t segment, int64_t h) {
  const int64_t k0 = pr.cu_k[segment], L = pr.cu_k[segment + 1] - k0, padded = padded_keys(L);
  const int64_t pairs = pr.D / 2, dpad = pr.dpad, base = pr.key_base[segment] * pr.kv_heads + h * padded;
  uint16_t* kpack = pr.kp + base * pr.D;
  uint16_t* vpack = pr.vp + base * dpad;
  auto key = [&](int64_t t) { return pr.k + (k0 + t) * pr.k_row + h * pr.k_head; };
  auto value = [&](int64_t t) { return pr.v + (k0 + t) * pr.v_row + h * pr.v_head; };
  for (int64_t t = 0; t < std::min<int64_t>(L, kPackAhead); ++t) {
    prefetch_row(key(t), pr.D);
    prefetch_row(value(t), pr.D);
  }
  std::fill(kpack, kpack + padded * pr.D, 0);
  int32_t* kp = reinterpret_cast<int32_t*>(kpack);
  for (int64_t t = 0; t < L; t += 2) {
    for (int64_t u = t + kPackAhead; u < std::min(L, t + kPackAhead + 2); ++u) {
      prefetch_row(key(u), pr.D);
      prefetch_row(value(u), pr.D);
    }
    const bool pair = t + 1 < L;
    for (int64_t e = 0; e < (pair ? 2 : 1); ++e) {
      const uint16_t* kr = key(t + e);
      int32_t* panel = kp + ((t + e) / 16) * pairs * 16 + (t + e) % 16;
      for (int64_t r = 0; r < pairs; ++r) panel[r * 16] = pair_at(kr + 2 * r);
    }
    // two value rows interleaved: (v[t][d], v[t + 1][d]) as one 32-bit lane, 16 columns per store
    const uint16_t *a = value(t), *b = pair ? value(t + 1) : nullptr;
    uint16_t* dst = vpack + (t / 2) * dpad * 2;
    for (int64_t d = 0; d < dpad; d += 16) {
      const __mmask16 cols = pr.D - d >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (pr.D - d)) - 1);
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(cols, a + d));
      const __m512i hi = b ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(cols, b + d)) : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + 2 * d, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
  const int64_t filled = (L + 1) / 2 * dpad * 2;
  std::fill(vpack + filled, vpack + padded * dpad, 0);
}

// Rows b0 .. b0 + 11 of one segment's q head h (over its kv head's packed keys and values). Causal: the block reads
// the keys up to its last row's last visible one; whole key tiles past it are skipped, the diagonal's are masked.
FOVEA_ATTN_TARGET void attend(const Problem& pr, int64_t segment, int64_t h, int64_t b0, Scratch& buf) {
  const int64_t q0 = pr.cu_q[segment], rows = pr.cu_q[segment + 1] - q0;
  const int64_t L = pr.cu_k[segment + 1] - pr.cu_k[segment];
  const int64_t pairs = pr.D / 2, dpad = pr.dpad, chunks = dpad / 16, kv = h / (pr.heads / pr.kv_heads);
  const int64_t base = pr.key_base[segment] * pr.kv_heads + kv * padded_keys(L);
  const uint16_t* kpack = pr.kp + base * pr.D;
  const uint16_t* vpack = pr.vp + base * dpad;
  const int R = static_cast<int>(std::min<int64_t>(kBlockRows, rows - b0));
  const int64_t shift = L - rows;  // causal: row i sees keys j <= i + shift (bottom-right)
  const int64_t end = pr.causal ? b0 + R + shift : L;  // keys the block reads
  const int64_t padded = padded_keys(end);
  const uint16_t* q = pr.q + (q0 + b0) * pr.q_row + h * pr.q_head;
  std::fill(buf.o.begin(), buf.o.begin() + R * dpad, 0.f);
  std::fill(buf.mx.begin(), buf.mx.end(), -std::numeric_limits<float>::infinity());
  std::fill(buf.l.begin(), buf.l.end(), 0.f);
  const ScoresFn scores = pick_scores(R, std::make_integer_sequence<int, kBlockRows>{});
  for (int64_t kb = 0; kb < padded; kb += kKeyBlock) {
    const int64_t nb = std::min<int64_t>(kKeyBlock, padded - kb), valid = std::min(nb, end - kb);
    std::fill(buf.vmax.begin(), buf.vmax.end(), -std::numeric_limits<float>::infinity());
    for (int64_t t = 0; t < nb; t += 32) {
      // row 0's visible keys from key kb + t on (row m sees m more); every key when nothing is masked
      const int64_t first = pr.causal ? b0 + shift + 1 - (kb + t) : kKeyBlock;
      scores(q, pr.q_row, kpack + (kb + t) * pr.D, pairs, buf.s.data() + t, kKeyBlock,
             static_cast<int>(std::min<int64_t>(32, valid - t)),
             static_cast<int>(std::max<int64_t>(-kBlockRows, std::min<int64_t>(first, kKeyBlock))), buf.vmax.data());
    }
    for (int m = 0; m < R; ++m) {
      // causal: every row sees key 0 (shift >= 0), so its first block has a key and later ones may have none
      const int64_t row_valid = pr.causal ? std::max<int64_t>(0, std::min(valid, b0 + m + shift + 1 - kb)) : valid;
      buf.alpha[m] = softmax_block(buf.s.data() + m * kKeyBlock, buf.vmax.data() + 16 * m, nb, row_valid, pr.scale,
                                   buf.mx[m], buf.l[m], buf.p.data() + m * kKeyBlock);
    }
    for (int64_t c0 = 0; c0 < chunks; c0 += 4) {
      const int c = static_cast<int>(std::min<int64_t>(4, chunks - c0)), tile = values_rows(c);
      for (int m0 = 0; m0 < R; m0 += tile) {
        const int r = std::min(tile, R - m0);
        values_fn(r, c)(buf.p.data() + m0 * kKeyBlock, kKeyBlock, vpack + (kb / 2) * dpad * 2 + c0 * 32, dpad * 2,
                        nb / 2, buf.o.data() + m0 * dpad + c0 * 16, dpad, buf.alpha.data() + m0);
      }
    }
  }
  for (int m = 0; m < R; ++m) {  // O / l, rounded once (torch multiplies by the reciprocal too)
    const float inv = 1.f / buf.l[m];
    uint16_t* y = pr.out + ((q0 + b0 + m) * pr.heads + h) * pr.D;
    const float* o = buf.o.data() + m * dpad;
    for (int64_t d = 0; d < pr.D; d += 16) {
      const __mmask16 mask = pr.D - d >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (pr.D - d)) - 1);
      const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(o + d), _mm512_set1_ps(inv));
      _mm256_mask_storeu_epi16(y + d, mask, (__m256i)_mm512_cvtneps_pbh(x));
    }
  }
}

void check_segments(const at::Tensor& cu, int64_t rows, const char* name, const char* what) {
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 2 && cu.scalar_type() == at::kLong && cu.is_contiguous(), name,
              " must be a contiguous int64 [num_segments + 1] tensor of offsets");
  const int64_t* c = cu.data_ptr<int64_t>();
  TORCH_CHECK(c[0] == 0 && c[cu.size(0) - 1] == rows, name, " must run from 0 to the ", rows, " rows of ", what,
              "; got ", c[0], " .. ", c[cu.size(0) - 1]);
  for (int64_t i = 1; i < cu.size(0); ++i) {
    TORCH_CHECK(c[i] >= c[i - 1], name, " must not decrease; offset ", i, " is ", c[i], " after ", c[i - 1]);
  }
}

void check_qkv(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3 && t.scalar_type() == at::kBFloat16 && t.stride(2) == 1, name,
              " must be a bfloat16 [rows, heads, head_dim] tensor with contiguous heads; got ", t.scalar_type(), " ",
              t.sizes());
}

}  // namespace

bool encoder_attention_compiled() { return true; }

at::Tensor encoder_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, double scale,
                             bool causal) {
  check_qkv(q, "q");
  check_qkv(k, "k");
  check_qkv(v, "v");
  const int64_t rows = q.size(0), heads = q.size(1), D = q.size(2), kv_heads = k.size(1);
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have one shape; got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(2) == D && kv_heads > 0 && heads % kv_heads == 0, "k and v must have q's ", heads,
              " heads of ", D, ", or a number of heads of ", D, " that divides ", heads, " (grouped-query); got ",
              k.sizes());
  TORCH_CHECK(D > 0 && D % 2 == 0, "head_dim must be even (pairs of bfloat16 per product); got ", D);
  check_segments(cu_seqlens_q, rows, "cu_seqlens_q", "q");
  check_segments(cu_seqlens_k, k.size(0), "cu_seqlens_k", "k");
  TORCH_CHECK(cu_seqlens_q.size(0) == cu_seqlens_k.size(0), "cu_seqlens_q and cu_seqlens_k must count the same "
              "segments; got ", cu_seqlens_q.size(0) - 1, " and ", cu_seqlens_k.size(0) - 1);
  const int64_t segments = cu_seqlens_q.size(0) - 1;
  const int64_t *cq = cu_seqlens_q.data_ptr<int64_t>(), *ck = cu_seqlens_k.data_ptr<int64_t>();
  std::vector<int64_t> key_base(segments + 1, 0);  // prefix sums of the segments' padded key counts
  for (int64_t i = 0; i < segments; ++i) {
    const int64_t n_q = cq[i + 1] - cq[i], n_k = ck[i + 1] - ck[i];
    TORCH_CHECK(n_q == 0 || n_k > 0, "segment ", i, " has ", n_q, " queries and no keys");
    TORCH_CHECK(!causal || n_q <= n_k, "causal segment ", i, " has ", n_q, " queries for ", n_k,
                " keys; the queries are the last of the keys' positions, so at most as many");
    key_base[i + 1] = key_base[i] + padded_keys(n_k);
  }
  auto out = at::empty({rows, heads, D}, q.options());
  if (rows == 0) return out;
  const int64_t dpad = (D + 15) / 16 * 16;
  // uninitialised: packing writes every element, the zeros included
  std::unique_ptr<uint16_t[]> kp(new uint16_t[key_base[segments] * kv_heads * D]);
  std::unique_ptr<uint16_t[]> vp(new uint16_t[key_base[segments] * kv_heads * dpad]);
  auto u16 = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); };
  const Problem pr{u16(q), u16(k), u16(v), q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
                   v.stride(1), cq, ck, heads, kv_heads, D, dpad, static_cast<float>(scale), causal,
                   reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), kp.get(), vp.get(), key_base.data()};
  // Work items, from one counter: each (segment, kv head)'s packing, once for all of its q heads, and then one
  // query block of one q head each (small items, so a core slowed by its neighbour hands work over, and a causal
  // segment's long last blocks spread). A kv head's blocks follow one another, and the next kv head's packing is
  // dealt just before them: it is done (rarely waited for) when they start, and still in cache.
  std::vector<Item> work;
  std::vector<int64_t> packs;  // (segment, kv head) indices with queries, in order
  for (int64_t i = 0; i < segments; ++i) {
    if (cq[i + 1] == cq[i]) continue;
    for (int64_t g = 0; g < kv_heads; ++g) packs.push_back(i * kv_heads + g);
  }
  const int64_t group = heads / kv_heads;
  for (size_t j = 0; j < packs.size(); ++j) {
    if (j == 0) work.push_back({packs[0], -1, 0});
    if (j + 1 < packs.size()) work.push_back({packs[j + 1], -1, 0});
    const int64_t segment = packs[j] / kv_heads, kv = packs[j] % kv_heads;
    for (int64_t h = kv * group; h < (kv + 1) * group; ++h) {
      for (int64_t b0 = 0; b0 < cq[segment + 1] - cq[segment]; b0 += kBlockRows) work.push_back({packs[j], h, b0});
    }
  }
  std::unique_ptr<std::atomic<bool>[]> packed(new std::atomic<bool>[segments * kv_heads]);
  for (int64_t i = 0; i < segments * kv_heads; ++i) packed[i].store(false, std::memory_order_relaxed);
  WorkCounter items(static_cast<int64_t>(work.size()));
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    Scratch buf;
    buf.s.resize(kBlockRows * kKeyBlock);
    buf.vmax.resize(kBlockRows * 16);
    buf.p.resize(kBlockRows * kKeyBlock);
    buf.o.resize(kBlockRows * dpad);
    buf.mx.resize(kBlockRows);
    buf.l.resize(kBlockRows);
    buf.alpha.resize(kBlockRows);
    for (int64_t i; items.take(i);) {
      const Item& item = work[i];
      if (item.head < 0) {
        pack_keys_values(pr, item.pack / kv_heads, item.pack % kv_heads);
        packed[item.pack].store(true, std::memory_order_release);
        continue;
      }
      // its packing was dealt earlier, so another thread holds it (one thread alone has done it)
      while (!packed[item.pack].load(std::memory_order_acquire)) _mm_pause();
      attend(pr, item.pack / kv_heads, item.head, item.block, buf);
    }
  });
  return out;
}

#else  // no AVX-512 BF16 code from this compiler or on this architecture

bool encoder_attention_compiled() { return false; }
at::Tensor encoder_attention(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, double, bool) {
  TORCH_CHECK(false, "fovea's AVX-512 BF16 encoder attention was not compiled (x86-64 with gcc >= 10 or clang >= 9)");
}

#endif

}  // namespace fovea

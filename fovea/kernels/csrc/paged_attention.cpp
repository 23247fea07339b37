// Decode attention straight from the paged KV cache: every key and value read once, where it lies in the pool.
// Decode is bound by memory traffic; gathering each request's blocks into a padded tensor and then running SDPA
// reads and writes the whole context twice more than needed. With AVX-512 and a head size of 64 or 128
// (`decode_avx512`) a work item is a request and a run of its kv heads, read slot by slot (bfloat16 heads of 64
// without GQA: the same with AVX-512 BF16 score products, `decode_bf16_mha64`); otherwise (the generic loop) one
// (request, kv head) pair.
// An optional additive bias [B, H, >= L] (float32; T5's relative position scores) is added to the scaled scores.
#include <ATen/Parallel.h>

#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "ops.h"

// -march=native (the build is keyed by the CPU's features): AVX-512 here means this CPU runs it
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define FOVEA_PAGED_AVX512 1
#include <immintrin.h>
#if defined(__AVX512BF16__)
#define FOVEA_PAGED_BF16 1  // bfloat16 heads of 64 without GQA: `decode_bf16_mha64`
#endif
#endif

namespace fovea {
namespace {

// The softmax of one score row in place (max subtracted, exp, sum); returns the sum.
inline float softmax_unnormalised(float* s, int64_t L) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < L; ++t) m = std::max(m, s[t]);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < L; ++t) {
    s[t] = exp_approx<true>(s[t] - m);
    sum += s[t];
  }
  return sum;
}

#ifdef FOVEA_PAGED_AVX512
// 16 elements as float32: bfloat16 widened by a shift (exact), float32 as it is
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// The generic loop below reads each (request, kv head) pair's keys as 128-byte pieces 1.5 KB apart (the pool is
// [slots, Hkv, D]) with a horizontal sum per element chain: at OPT-125m's 12 heads x ~100 tokens x 64 requests it
// took ~3 ms per layer, 3x a plain read of the same bytes and more than the step's linears. Here a work item is
// one request and a run of its kv heads (all of them when there are enough requests to keep the threads busy), so
// a slot's keys for those heads are one contiguous read and a block of them one stream; a head of D = 16 C floats
// sits in C registers: each key row is C loads and C FMAs per query head and one horizontal sum, each value row C
// loads and C FMAs into float32 accumulators. Same float32 arithmetic as the generic loop (q scaled first, FMAs,
// the same exp), summed in another order.
template <typename T, int64_t D>
void decode_avx512(const T* q, const T* kc, const T* vc, const int64_t* tables, const int64_t* ctx, T* out,
                   int64_t B, int64_t H, int64_t Hkv, int64_t max_blocks, int64_t bs, float scale, const float* bias,
                   int64_t bias_len) {
  constexpr int C = D / 16;
  const int64_t G = H / Hkv;
  const int64_t row_stride = Hkv * D;  // elements from one slot to the next
  // enough items for the threads to share (4 each), never fewer heads than one per item
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::min(Hkv, std::max<int64_t>(1, (4 * threads + B - 1) / B));
  const int64_t per_chunk = (Hkv + chunks - 1) / chunks;
  WorkCounter items(B * chunks);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    std::vector<float> scores, qf(per_chunk * G * D), inv(per_chunk * G);
    std::vector<__m512> acc(per_chunk * G * C);
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t item; items.take(item);) {
      const int64_t b = item / chunks, h0 = (item % chunks) * per_chunk, L = ctx[b];
      const int64_t nh = std::min(Hkv, h0 + per_chunk) - h0;  // kv heads of this item
      if (nh <= 0) continue;
      const int64_t rows = nh * G;  // query heads of this item: (kv head, g) in order, contiguous in q and out
      scores.resize(rows * L);
      const T* qb = q + (b * H + h0 * G) * D;
      for (int64_t r = 0; r < rows; ++r)
        for (int c = 0; c < C; ++c)
          _mm512_storeu_ps(qf.data() + r * D + 16 * c, _mm512_mul_ps(load16(qb + r * D + 16 * c), vscale));
      const int64_t* table = tables + b * max_blocks;
      for (int64_t t0 = 0; t0 < L; t0 += bs) {
        const T* k = kc + (table[t0 / bs] * bs * Hkv + h0) * D;
        const int64_t n = std::min(bs, L - t0);
        for (int64_t i = 0; i < n; ++i, k += row_stride) {
          for (int64_t hh = 0; hh < nh; ++hh) {
            __m512 kr[C];
            for (int c = 0; c < C; ++c) kr[c] = load16(k + hh * D + 16 * c);
            for (int64_t g = 0; g < G; ++g) {
              const float* qg = qf.data() + (hh * G + g) * D;
              __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qg), kr[0]);
              for (int c = 1; c < C; ++c) a = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * c), kr[c], a);
              scores[(hh * G + g) * L + t0 + i] = _mm512_reduce_add_ps(a);
            }
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* sr = scores.data() + r * L;
        if (bias != nullptr) {
          const float* br = bias + (b * H + h0 * G + r) * bias_len;
#pragma omp simd
          for (int64_t t = 0; t < L; ++t) sr[t] += br[t];
        }
        inv[r] = 1.f / softmax_unnormalised(sr, L);
      }
      for (int64_t j = 0; j < rows * C; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t t0 = 0; t0 < L; t0 += bs) {
        const T* v = vc + (table[t0 / bs] * bs * Hkv + h0) * D;
        const int64_t n = std::min(bs, L - t0);
        for (int64_t i = 0; i < n; ++i, v += row_stride) {
          for (int64_t hh = 0; hh < nh; ++hh) {
            __m512 vr[C];
            for (int c = 0; c < C; ++c) vr[c] = load16(v + hh * D + 16 * c);
            for (int64_t g = 0; g < G; ++g) {
              const int64_t r = hh * G + g;
              const __m512 p = _mm512_set1_ps(scores[r * L + t0 + i]);
              for (int c = 0; c < C; ++c) acc[r * C + c] = _mm512_fmadd_ps(p, vr[c], acc[r * C + c]);
            }
          }
        }
      }
      T* o = out + (b * H + h0 * G) * D;
      float result[D];
      for (int64_t r = 0; r < rows; ++r) {
        const __m512 scale_r = _mm512_set1_ps(inv[r]);
        for (int c = 0; c < C; ++c) _mm512_storeu_ps(result + 16 * c, _mm512_mul_ps(acc[r * C + c], scale_r));
        for (int64_t d = 0; d < D; ++d) o[r * D + d] = static_cast<T>(result[d]);
      }
    }
  });
}
#endif

#ifdef FOVEA_PAGED_BF16
// v[0..15] -> one vector of their 16 horizontal sums (lane i = sum of v[i]): pairs, quads, then across the four
// 128-bit lanes, 45 instructions for 16 sums where one `_mm512_reduce_add_ps` per key is ~8 (and a long chain)
inline __m512 sum16(const __m512* v) {
  __m512 s2[8], s4[4];
  for (int j = 0; j < 8; ++j)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] of a = v[2j], b = v[2j+1]
    s2[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
  for (int j = 0; j < 4; ++j) {  // per 128-bit lane: the lane's sums of v[4j .. 4j + 3]
    const __m512d a = _mm512_castps_pd(s2[2 * j]), b = _mm512_castps_pd(s2[2 * j + 1]);
    s4[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // lanes (0, 2) + (1, 3) of two quads, then once more: lane l of the result holds v[4l .. 4l + 3]'s full sums
  const __m512 u01 = _mm512_add_ps(_mm512_shuffle_f32x4(s4[0], s4[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(s4[0], s4[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 u23 = _mm512_add_ps(_mm512_shuffle_f32x4(s4[2], s4[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(s4[2], s4[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u01, u23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(u01, u23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// bfloat16 heads of 64 without GQA (T5, OPT: a decode step's self- and cross-attention), the layout and work items
// of `decode_avx512`. Scores: two AVX-512 BF16 dot products (`vdpbf16ps`) per key and head over the bf16 pairs of q
// and k as stored, where `decode_avx512` widens the key to float32 and runs four FMAs; the 16 partial sums of 16 keys
// are then reduced together (`sum16`), not one key at a time. A product of two bfloat16 is exact in float32 either
// way, so only the order of the float32 sums differs (and the scale is applied to the sum, where `decode_avx512`
// scales q: the same arithmetic for T5's 1 and a power-of-two head_dim ** -0.5). Values: a 64-byte load of 32 bf16
// is 16 even and 16 odd elements as float32 by one shift and one mask (no widening load), with the same FMAs in the
// same order as `decode_avx512`, so the output is that loop's to the bit given the same probabilities.
void decode_bf16_mha64(const c10::BFloat16* q, const c10::BFloat16* kc, const c10::BFloat16* vc,
                       const int64_t* tables, const int64_t* ctx, c10::BFloat16* out, int64_t B, int64_t H,
                       int64_t max_blocks, int64_t bs, float scale, const float* bias, int64_t bias_len) {
  constexpr int64_t D = 64;
  const int64_t row_stride = H * D;  // elements from one slot to the next
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::min(H, std::max<int64_t>(1, (4 * threads + B - 1) / B));
  const int64_t per_chunk = (H + chunks - 1) / chunks;
  WorkCounter items(B * chunks);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    std::vector<float> scores, inv(per_chunk);
    std::vector<__m512> part(per_chunk * 16), acc(per_chunk * 4);
    const __m512 vscale = _mm512_set1_ps(scale);
    const __m512i odd_mask = _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u));
    for (int64_t item; items.take(item);) {
      const int64_t b = item / chunks, h0 = (item % chunks) * per_chunk, L = ctx[b];
      const int64_t nh = std::min(H, h0 + per_chunk) - h0;
      if (nh <= 0) continue;
      scores.resize(nh * L);
      const auto* qb = reinterpret_cast<const uint16_t*>(q + (b * H + h0) * D);
      const int64_t* table = tables + b * max_blocks;
      for (int64_t t0 = 0; t0 < L; t0 += bs) {
        const auto* kblock = reinterpret_cast<const uint16_t*>(kc + (table[t0 / bs] * bs * H + h0) * D);
        const int64_t n = std::min(bs, L - t0);
        for (int64_t i0 = 0; i0 < n; i0 += 16) {  // 16 keys at a time (fewer at the block's end)
          const int64_t m = std::min<int64_t>(16, n - i0);
          for (int64_t i = 0; i < m; ++i) {
            const uint16_t* k = kblock + (i0 + i) * row_stride;
            for (int64_t hh = 0; hh < nh; ++hh) {
              const uint16_t* kh = k + hh * D;
              const uint16_t* qh = qb + hh * D;
              __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_loadu_si512(kh),
                                          (__m512bh)_mm512_loadu_si512(qh));
              part[hh * 16 + i] = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(kh + 32),
                                                   (__m512bh)_mm512_loadu_si512(qh + 32));
            }
          }
          const __mmask16 keep = static_cast<__mmask16>((1u << m) - 1);
          for (int64_t hh = 0; hh < nh; ++hh) {
            for (int64_t i = m; i < 16; ++i) part[hh * 16 + i] = _mm512_setzero_ps();
            _mm512_mask_storeu_ps(scores.data() + hh * L + t0 + i0, keep,
                                  _mm512_mul_ps(sum16(part.data() + hh * 16), vscale));
          }
        }
      }
      for (int64_t hh = 0; hh < nh; ++hh) {
        float* sr = scores.data() + hh * L;
        if (bias != nullptr) {
          const float* br = bias + (b * H + h0 + hh) * bias_len;
#pragma omp simd
          for (int64_t t = 0; t < L; ++t) sr[t] += br[t];
        }
        inv[hh] = 1.f / softmax_unnormalised(sr, L);
      }
      // acc[hh * 4 + c]: c = 0, 1 the even and odd elements of d < 32, c = 2, 3 those of d >= 32
      for (int64_t j = 0; j < nh * 4; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t t0 = 0; t0 < L; t0 += bs) {
        const auto* v = reinterpret_cast<const uint16_t*>(vc + (table[t0 / bs] * bs * H + h0) * D);
        const int64_t n = std::min(bs, L - t0);
        for (int64_t i = 0; i < n; ++i, v += row_stride) {
          for (int64_t hh = 0; hh < nh; ++hh) {
            const __m512 p = _mm512_set1_ps(scores[hh * L + t0 + i]);
            for (int c = 0; c < 2; ++c) {
              const __m512i pairs = _mm512_loadu_si512(v + hh * D + 32 * c);
              __m512* a = acc.data() + hh * 4 + 2 * c;
              a[0] = _mm512_fmadd_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)), a[0]);
              a[1] = _mm512_fmadd_ps(p, _mm512_castsi512_ps(_mm512_and_si512(pairs, odd_mask)), a[1]);
            }
          }
        }
      }
      c10::BFloat16* o = out + (b * H + h0) * D;
      alignas(64) float even[16], odd[16];
      for (int64_t hh = 0; hh < nh; ++hh) {
        const __m512 scale_h = _mm512_set1_ps(inv[hh]);
        for (int c = 0; c < 2; ++c) {
          _mm512_store_ps(even, _mm512_mul_ps(acc[hh * 4 + 2 * c], scale_h));
          _mm512_store_ps(odd, _mm512_mul_ps(acc[hh * 4 + 2 * c + 1], scale_h));
          for (int j = 0; j < 16; ++j) {
            o[hh * D + 32 * c + 2 * j] = static_cast<c10::BFloat16>(even[j]);
            o[hh * D + 32 * c + 2 * j + 1] = static_cast<c10::BFloat16>(odd[j]);
          }
        }
      }
    }
  });
}
#endif

// DC > 0: the head size known at compile time (fixed trip counts unroll and vectorise better); 0: runtime `dim`
template <typename T, int64_t DC>
void decode(const T* q, const T* kc, const T* vc, const int64_t* tables, const int64_t* ctx, T* out, int64_t B,
            int64_t H, int64_t Hkv, int64_t dim, int64_t max_blocks, int64_t bs, float scale, const float* bias,
            int64_t bias_len) {
  const int64_t D = DC > 0 ? DC : dim;
  const int64_t G = H / Hkv;  // query heads per kv head (GQA): each K/V row is read once for all G of them
  WorkCounter items(B * Hkv);  // contexts differ in length, and so may the threads' speeds
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<float> qf(G * D), acc(G * D), row(D), denom(G), scores;
    for (int64_t item; items.take(item);) {
      const int64_t b = item / Hkv, h = item % Hkv, L = ctx[b];
      scores.resize(G * L);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = static_cast<float>(q[(b * H + h * G + g) * D + d]) * scale;
      const int64_t* table = tables + b * max_blocks;
      for (int64_t t = 0; t < L; ++t) {
        const T* k = kc + ((table[t / bs] * bs + t % bs) * Hkv + h) * D;
        float* kf = row.data();
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) kf[d] = load(k, d);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf.data() + g * D;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s = mul_add<true>(qg[d], kf[d], s);
          scores[g * L + t] = s;
        }
      }
      if (bias != nullptr)
        for (int64_t g = 0; g < G; ++g) {
          const float* bg = bias + (b * H + h * G + g) * bias_len;
          float* sg = scores.data() + g * L;
#pragma omp simd
          for (int64_t t = 0; t < L; ++t) sg[t] += bg[t];
        }
      for (int64_t g = 0; g < G; ++g) denom[g] = softmax_unnormalised(scores.data() + g * L, L);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < L; ++t) {
        const T* v = vc + ((table[t / bs] * bs + t % bs) * Hkv + h) * D;
        float* vf = row.data();
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) vf[d] = load(v, d);
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * L + t];
          float* ag = acc.data() + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ag[d] = mul_add<true>(p, vf[d], ag[d]);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const float inv = 1.f / denom[g];
        for (int64_t d = 0; d < D; ++d) out[(b * H + h * G + g) * D + d] = static_cast<T>(acc[g * D + d] * inv);
      }
    }
  });
}

}  // namespace

at::Tensor paged_decode(at::Tensor q, const at::Tensor& k_cache, const at::Tensor& v_cache, at::Tensor block_table,
                        at::Tensor context_lens, double scale, int64_t block_size,
                        const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3, "q [B, H, D], caches [slots, Hkv, D]");
  q = q.contiguous().to(k_cache.scalar_type());
  block_table = block_table.contiguous();
  context_lens = context_lens.contiguous();
  auto out = at::empty_like(q);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(1);
  at::Tensor bias_f;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 3 && bias->size(0) == B && bias->size(1) == H, "bias must be [B, H, L], got ",
                bias->sizes());
    TORCH_CHECK(context_lens.numel() == 0 || context_lens.max().item<int64_t>() <= bias->size(2),
                "bias is shorter than the longest context");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const float* bias_ptr = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const int64_t bias_len = bias_f.defined() ? bias_f.size(2) : 0;
#ifdef FOVEA_PAGED_BF16
  if (D == 64 && Hkv == H && q.scalar_type() == at::kBFloat16) {
    decode_bf16_mha64(q.data_ptr<c10::BFloat16>(), k_cache.data_ptr<c10::BFloat16>(),
                      v_cache.data_ptr<c10::BFloat16>(), block_table.data_ptr<int64_t>(),
                      context_lens.data_ptr<int64_t>(), out.data_ptr<c10::BFloat16>(), B, H, block_table.size(1),
                      block_size, static_cast<float>(scale), bias_ptr, bias_len);
    return out;
  }
#endif
#ifdef FOVEA_PAGED_AVX512
  if ((D == 64 || D == 128) && (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat)) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "paged_decode_avx512", [&] {
      if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
        auto run = D == 64 ? decode_avx512<scalar_t, 64> : decode_avx512<scalar_t, 128>;
        run(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
            block_table.data_ptr<int64_t>(), context_lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), B, H, Hkv,
            block_table.size(1), block_size, static_cast<float>(scale), bias_ptr, bias_len);
      }
    });
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    auto run = D == 64 ? decode<scalar_t, 64> : D == 128 ? decode<scalar_t, 128> : decode<scalar_t, 0>;
    run(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
        block_table.data_ptr<int64_t>(), context_lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
        B, H, Hkv, D, block_table.size(1), block_size, static_cast<float>(scale), bias_ptr, bias_len);
  });
  return out;
}

}  // namespace fovea

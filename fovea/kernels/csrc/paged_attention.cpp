// Decode attention straight from the paged KV cache: every key and value read once, where it lies in the pool,
// one (request, kv head) pair per work item. Decode is bound by memory traffic; gathering each request's blocks
// into a padded tensor and then running SDPA reads and writes the whole context twice more than needed.
// An optional additive bias [B, H, >= L] (float32; T5's relative position scores) is added to the scaled scores.
#include <ATen/Parallel.h>

#include <limits>
#include <vector>

#include "common.h"
#include "ops.h"

namespace fovea {
namespace {

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
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * L;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < L; ++t) m = std::max(m, sg[t]);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < L; ++t) {
          sg[t] = exp_approx<true>(sg[t] - m);
          sum += sg[t];
        }
        denom[g] = sum;
      }
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    auto run = D == 64 ? decode<scalar_t, 64> : D == 128 ? decode<scalar_t, 128> : decode<scalar_t, 0>;
    run(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
        block_table.data_ptr<int64_t>(), context_lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
        B, H, Hkv, D, block_table.size(1), block_size, static_cast<float>(scale), bias_ptr, bias_len);
  });
  return out;
}

}  // namespace fovea

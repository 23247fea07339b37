// Fused element-wise kernels of a decoder layer (RMSNorm, residual add + RMSNorm, rotary, SiLU-and-multiply, the
// KV-cache write) and the sampler's argmax.
// Each reproduces its torch formula's roundings op by op; see fovea/kernels/ops.py for the formulas. The build
// passes -ffp-contract=off, so no product is fused into an add that torch would have rounded first.
#include <ATen/Parallel.h>

#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "ops.h"

namespace fovea {
namespace {

// rms_norm_row (common.h): add_rms_norm_ calls the same function, so its normed rows equal rms_norm's bit for bit
template <typename T>
void rms_norm_rows(const T* x, const T* w, T* y, int64_t N, int64_t D, int64_t x_stride, float eps) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) rms_norm_row(x + n * x_stride, w, y + n * D, D, eps);
  });
}

// x += residual (each sum rounded to T, as torch's add), then y = rms_norm(x)
template <typename T>
void add_rms_norm_rows(T* x, const T* residual, const T* w, T* y, int64_t N, int64_t D, int64_t x_stride,
                       int64_t r_stride, float eps) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      T* xr = x + n * x_stride;
      const T* rr = residual + n * r_stride;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) store(xr, d, round_to(load(xr, d) + load(rr, d), xr));
      rms_norm_row(xr, w, y + n * D, D, eps);
    }
  });
}

// rows of k and v [N, Hkv * D] (any row stride) into slot slot_mapping[n] of each cache [slots, Hkv, D]
template <typename T>
void write_kv_rows(const T* k, const T* v, T* k_cache, T* v_cache, const int64_t* slots, int64_t N, int64_t width,
                   int64_t k_stride, int64_t v_stride) {
  for (int64_t n = 0; n < N; ++n) {
    std::memcpy(k_cache + slots[n] * width, k + n * k_stride, width * sizeof(T));
    std::memcpy(v_cache + slots[n] * width, v + n * v_stride, width * sizeof(T));
  }
}

// C is cos/sin's type: T (round every op to T) or float (float arithmetic, round once)
template <typename T, typename C>
void rotary_rows(T* x, const C* cos, const C* sin, int64_t N, int64_t heads, int64_t D, int64_t x_stride,
                 int64_t cs_stride) {
  const int64_t half = D / 2;
  const T* tag = nullptr;
  const bool round_each = !std::is_same<C, float>::value || std::is_same<T, float>::value;
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const C* c = cos + n * cs_stride;
      const C* s = sin + n * cs_stride;
      for (int64_t h = 0; h < heads; ++h) {
        T* xh = x + n * x_stride + h * D;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float a = load(xh, i), b = load(xh, i + half);  // rotate_half(x) = (-b, a)
          float lo, hi;
          if (round_each) {
            lo = round_to(round_to(a * load(c, i), tag) + round_to(-b * load(s, i), tag), tag);
            hi = round_to(round_to(b * load(c, i + half), tag) + round_to(a * load(s, i + half), tag), tag);
          } else {
            lo = round_to(a * load(c, i) + -b * load(s, i), tag);
            hi = round_to(b * load(c, i + half) + a * load(s, i + half), tag);
          }
          store(xh, i, lo);
          store(xh, i + half, hi);
        }
      }
    }
  });
}

template <typename T>
void silu_mul_rows(const T* gate_up, T* y, int64_t N, int64_t I, int64_t stride) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    // two passes per row: gcc 12 makes one loop of exp, divide and multiply ~10x slower than the two
    std::vector<float> e(I);
    for (int64_t n = begin; n < end; ++n) {
      const T* gate = gate_up + n * stride;
      const T* up = gate + I;
      T* yr = y + n * I;
      for (int64_t i = 0; i < I; ++i) e[i] = exp_approx(-load(gate, i));
      for (int64_t i = 0; i < I; ++i) {
        const float act = round_to(load(gate, i) / (1.f + e[i]), gate);
        store(yr, i, round_to(act * load(up, i), gate));
      }
    }
  });
}

template <typename T>
void first_argmax_rows(const T* x, int64_t* out, int64_t B, int64_t V, int64_t stride) {
  constexpr int64_t kChunk = 256;  // the scan for the first maximum tests a chunk at a time
  WorkCounter rows(B);
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t b; rows.take(b);) {
      const T* r = x + b * stride;
      float best = -std::numeric_limits<float>::infinity();
      int nan = 0;
#pragma omp simd reduction(max : best) reduction(| : nan)
      for (int64_t i = 0; i < V; ++i) {
        const float v = load(r, i);
        best = std::max(best, v);
        nan |= v != v;
      }
      // the first entry equal to `best` (the first NaN: NaN is the one value that differs from itself)
      const auto is_target = [&](int64_t i) {
        const float v = load(r, i);
        return nan ? v != v : v == best;
      };
      int64_t found = 0;
      for (int64_t lo = 0; lo < V; lo += kChunk) {
        const int64_t hi = std::min(V, lo + kChunk);
        int hit = 0;
        if (nan) {
#pragma omp simd reduction(| : hit)
          for (int64_t i = lo; i < hi; ++i) hit |= load(r, i) != load(r, i);
        } else {
#pragma omp simd reduction(| : hit)
          for (int64_t i = lo; i < hi; ++i) hit |= load(r, i) == best;
        }
        if (!hit) continue;
        found = lo;
        while (!is_target(found)) ++found;
        break;
      }
      out[b] = found;
    }
  });
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, at::Tensor weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [N, D] with contiguous rows");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.numel() == x.size(1), "weight [D] in x's dtype");
  weight = weight.contiguous();
  auto y = at::empty({x.size(0), x.size(1)}, x.options());
  AT_DISPATCH_SWITCH(x.scalar_type(), "rms_norm",
    AT_DISPATCH_CASE(at::kFloat, [&] {
      rms_norm_rows(x.data_ptr<float>(), weight.data_ptr<float>(), y.data_ptr<float>(), x.size(0), x.size(1),
                    x.stride(0), static_cast<float>(eps)); })
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      rms_norm_rows(x.data_ptr<c10::BFloat16>(), weight.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(),
                    x.size(0), x.size(1), x.stride(0), static_cast<float>(eps)); }));
  return y;
}

at::Tensor add_rms_norm_(const at::Tensor& x, const at::Tensor& residual, at::Tensor weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [N, D] with contiguous rows");
  TORCH_CHECK(residual.dim() == 2 && residual.stride(1) == 1 && residual.sizes() == x.sizes() &&
              residual.scalar_type() == x.scalar_type(), "residual must be [N, D] like x, with contiguous rows");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.numel() == x.size(1), "weight [D] in x's dtype");
  weight = weight.contiguous();
  auto y = at::empty({x.size(0), x.size(1)}, x.options());
  AT_DISPATCH_SWITCH(x.scalar_type(), "add_rms_norm_",
    AT_DISPATCH_CASE(at::kFloat, [&] {
      add_rms_norm_rows(x.data_ptr<float>(), residual.data_ptr<float>(), weight.data_ptr<float>(),
                        y.data_ptr<float>(), x.size(0), x.size(1), x.stride(0), residual.stride(0),
                        static_cast<float>(eps)); })
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      add_rms_norm_rows(x.data_ptr<c10::BFloat16>(), residual.data_ptr<c10::BFloat16>(),
                        weight.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), x.size(0), x.size(1),
                        x.stride(0), residual.stride(0), static_cast<float>(eps)); }));
  return y;
}

void write_kv_(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slot_mapping,
               const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
              v_cache.is_contiguous(), "k_cache, v_cache must be contiguous [slots, kv_heads, head_dim] alike");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type() &&
              v_cache.scalar_type() == k_cache.scalar_type(), "k, v and the caches must have one dtype");
  const int64_t width = k_cache.size(1) * k_cache.size(2), num_slots = k_cache.size(0);
  TORCH_CHECK(k.dim() == 2 && v.dim() == 2 && k.size(1) == width && v.size(1) == width && k.stride(1) == 1 &&
              v.stride(1) == 1 && v.size(0) == k.size(0),
              "k, v must be [N, kv_heads * head_dim] with contiguous rows, like the caches");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 && slot_mapping.is_contiguous() &&
              slot_mapping.size(0) == k.size(0), "slot_mapping must be a contiguous int64 [N]");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t n = 0; n < k.size(0); ++n) {
    TORCH_CHECK(slots[n] >= 0 && slots[n] < num_slots, "slot_mapping[", n, "] = ", slots[n],
                " is outside the cache's ", num_slots, " slots");
  }
  AT_DISPATCH_SWITCH(k.scalar_type(), "write_kv_",
    AT_DISPATCH_CASE(at::kFloat, [&] {
      write_kv_rows(k.data_ptr<float>(), v.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                    slots, k.size(0), width, k.stride(0), v.stride(0)); })
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      write_kv_rows(k.data_ptr<c10::BFloat16>(), v.data_ptr<c10::BFloat16>(), k_cache.data_ptr<c10::BFloat16>(),
                    v_cache.data_ptr<c10::BFloat16>(), slots, k.size(0), width, k.stride(0), v.stride(0)); }));
}

void rotary_(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t heads, int64_t head_dim) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [N, width] with contiguous rows");
  TORCH_CHECK(head_dim % 2 == 0 && heads * head_dim <= x.size(1), "heads * head_dim must fit in a row");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == x.size(0) && cos.size(1) == head_dim && cos.stride(1) == 1 &&
              sin.sizes() == cos.sizes() && sin.strides() == cos.strides() &&
              sin.scalar_type() == cos.scalar_type(), "cos, sin must be [N, head_dim] alike");
  const bool is_float_cs = cos.scalar_type() == at::kFloat;
  TORCH_CHECK(is_float_cs || cos.scalar_type() == x.scalar_type(), "cos/sin in float32 or in x's dtype");
  const int64_t N = x.size(0), xs = x.stride(0), cs = cos.stride(0);
  if (x.scalar_type() == at::kFloat) {
    rotary_rows(x.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), N, heads, head_dim, xs, cs);
  } else if (x.scalar_type() == at::kBFloat16 && is_float_cs) {
    rotary_rows(x.data_ptr<c10::BFloat16>(), cos.data_ptr<float>(), sin.data_ptr<float>(), N, heads, head_dim, xs,
                cs);
  } else if (x.scalar_type() == at::kBFloat16) {
    rotary_rows(x.data_ptr<c10::BFloat16>(), cos.data_ptr<c10::BFloat16>(), sin.data_ptr<c10::BFloat16>(), N,
                heads, head_dim, xs, cs);
  } else {
    TORCH_CHECK(false, "rotary_: float32 or bfloat16 only");
  }
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "gate_up must be [N, 2 * I] with contiguous rows");
  const int64_t N = gate_up.size(0), I = gate_up.size(1) / 2;
  auto y = at::empty({N, I}, gate_up.options());
  AT_DISPATCH_SWITCH(gate_up.scalar_type(), "silu_mul",
    AT_DISPATCH_CASE(at::kFloat, [&] {
      silu_mul_rows(gate_up.data_ptr<float>(), y.data_ptr<float>(), N, I, gate_up.stride(0)); })
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      silu_mul_rows(gate_up.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), N, I, gate_up.stride(0)); }));
  return y;
}

at::Tensor first_argmax(const at::Tensor& values) {
  TORCH_CHECK(values.dim() == 2 && values.stride(1) == 1 && values.size(1) > 0,
              "values must be [B, V] with contiguous rows and V > 0");
  auto out = at::empty({values.size(0)}, values.options().dtype(at::kLong));
  AT_DISPATCH_SWITCH(values.scalar_type(), "first_argmax",
    AT_DISPATCH_CASE(at::kFloat, [&] {
      first_argmax_rows(values.data_ptr<float>(), out.data_ptr<int64_t>(), values.size(0), values.size(1),
                        values.stride(0)); })
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      first_argmax_rows(values.data_ptr<c10::BFloat16>(), out.data_ptr<int64_t>(), values.size(0), values.size(1),
                        values.stride(0)); }));
  return out;
}

}  // namespace fovea

// T5's element-wise kernels: its layer norm over a float32 residual stream, and Flan-T5's gated tanh-GELU.
// Each reproduces transformers' torch formula op by op (see fovea/kernels/ops.py); a decode step runs them over a
// few dozen rows, where torch's per-op cost (seven ops for the norm, five for the gate) is most of the time.
#include <ATen/Parallel.h>

#include <cmath>

#include "common.h"
#include "ops.h"

namespace fovea {
namespace {

// rows per parallel chunk: ~32K elements, so a decode step's few rows run on the calling thread alone
inline int64_t grain_rows(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, width)); }

// X: the residual stream's type (float32 after the first float32 `wo`; the embeddings' type before it),
// W: the weight's, which is also the output's
template <typename X, typename W>
void t5_layer_norm_rows(const X* x, const W* w, W* y, int64_t N, int64_t D, int64_t x_stride, float eps) {
  at::parallel_for(0, N, grain_rows(D), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const X* xr = x + n * x_stride;
      W* yr = y + n * D;
      rms_norm_row(xr, w, yr, D, eps);
    }
  });
}

// tanh(y) = sign(y) (1 - 2e / (1 + e)), e = exp(-2|y|): within an ulp or so of the float nearest tanh(y) where
// |tanh| is near 1, which is where GELU's 1 + tanh cancels and torch's (Sleef's) rounding of tanh shows; near 0
// the absolute error (~1e-7) vanishes in that 1 + tanh
inline float tanh_approx(float y) {
  const float e = exp_approx(-2.f * std::fabs(y));
  return std::copysign(1.f - 2.f * e / (1.f + e), y);
}

template <typename T>
void gelu_tanh_mul_rows(const T* a, const T* b, T* y, int64_t N, int64_t I, int64_t a_stride, int64_t b_stride) {
  // torch's tanh GELU: 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3))), each op rounded to float
  const float beta = static_cast<float>(M_SQRT2 * M_2_SQRTPI * 0.5), kappa = 0.044715f;
  at::parallel_for(0, N, grain_rows(I), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* ar = a + n * a_stride;
      const T* br = b + n * b_stride;
      T* yr = y + n * I;
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) {
        const float x = load(ar, i);
        const float inner = beta * (x + kappa * (x * x * x));
        const float act = round_to(0.5f * x * (1.f + tanh_approx(inner)), ar);
        store(yr, i, round_to(act * load(br, i), ar));
      }
    }
  });
}

}  // namespace

at::Tensor t5_layer_norm(const at::Tensor& x, at::Tensor weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [N, D] with contiguous rows");
  TORCH_CHECK(weight.numel() == x.size(1), "weight must be [D]");
  weight = weight.contiguous();
  auto y = at::empty({x.size(0), x.size(1)}, x.options().dtype(weight.scalar_type()));
  const int64_t N = x.size(0), D = x.size(1), xs = x.stride(0);
  const float e = static_cast<float>(eps);
  const auto xt = x.scalar_type(), wt = weight.scalar_type();
  if (xt == at::kFloat && wt == at::kFloat) {
    t5_layer_norm_rows(x.data_ptr<float>(), weight.data_ptr<float>(), y.data_ptr<float>(), N, D, xs, e);
  } else if (xt == at::kFloat && wt == at::kBFloat16) {
    t5_layer_norm_rows(x.data_ptr<float>(), weight.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), N, D, xs,
                       e);
  } else if (xt == at::kBFloat16 && wt == at::kBFloat16) {
    t5_layer_norm_rows(x.data_ptr<c10::BFloat16>(), weight.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(),
                       N, D, xs, e);
  } else {
    TORCH_CHECK(false, "t5_layer_norm: x float32 or bfloat16, weight float32 or bfloat16 (not wider than x); got ",
                xt, " and ", wt);
  }
  return y;
}

at::Tensor gelu_tanh_mul(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && a.stride(1) == 1 && b.dim() == 2 && b.stride(1) == 1,
              "a and b must be [N, I] with contiguous rows");
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type(), "a and b must match in shape and dtype");
  const int64_t N = a.size(0), I = a.size(1);
  auto y = at::empty({N, I}, a.options());
  AT_DISPATCH_SWITCH(a.scalar_type(), "gelu_tanh_mul",
    AT_DISPATCH_CASE(at::kFloat, [&] {
      gelu_tanh_mul_rows(a.data_ptr<float>(), b.data_ptr<float>(), y.data_ptr<float>(), N, I, a.stride(0),
                         b.stride(0)); })
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      gelu_tanh_mul_rows(a.data_ptr<c10::BFloat16>(), b.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), N, I,
                         a.stride(0), b.stride(0)); }));
  return y;
}

}  // namespace fovea

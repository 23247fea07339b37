// Helpers shared by fovea's CPU kernels: the bfloat16 load, a vectorisable exp, the work counter.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace fovea {

// Element i of p as a float; bfloat16 by shifting its bits, which the compiler vectorises (c10's conversion it
// does not).
template <typename T>
inline float load(const T* p, int64_t i) { return static_cast<float>(p[i]); }
inline float load(const c10::BFloat16* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// a * b + c: one rounding (an FMA) when kFused and the CPU has FMA, else two. The extension is built with
// -ffp-contract=off because the fused kernels reproduce torch's roundings op by op; a kernel free to fuse asks
// for it here (paged attention's dot products and softmax).
template <bool kFused>
inline float mul_add(float a, float b, float c) {
#ifdef __FMA__
  if (kFused) return __builtin_fmaf(a, b, c);
#endif
  return a * b + c;
}

// exp(x) in plain arithmetic, so a loop that calls it vectorises (a libm call would not): exp(x) = 2^n * exp(r),
// |r| <= ln2 / 2, exp(r) by Cephes' expf polynomial, about 1 ulp in float32; x is clamped to [-87, 88], where
// 2^n stays a normal float (exp(-87) ~ 1.6e-38 and exp(88) ~ 1.7e38 stand in for 0 and inf). gcc vectorises a
// loop calling it only with -fno-trapping-math (the floor could raise an FP flag; nothing here reads them).
// kFused: the multiply-adds as FMAs.
template <bool kFused = false>
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(mul_add<kFused>(x, 1.44269504088896341f, 0.5f));
  const float r = mul_add<kFused>(n, 2.12194440e-4f, mul_add<kFused>(-n, 0.693359375f, x));
  float p = 1.9875691500e-4f;
  p = mul_add<kFused>(p, r, 1.3981999507e-3f);
  p = mul_add<kFused>(p, r, 8.3334519073e-3f);
  p = mul_add<kFused>(p, r, 4.1665795894e-2f);
  p = mul_add<kFused>(p, r, 1.6666665459e-1f);
  p = mul_add<kFused>(p, r, 5.0000001201e-1f);
  p = mul_add<kFused>(p * r, r, r) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Work items handed out one at a time from a shared counter, for a kernel run as
//   WorkCounter items(n);
//   at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
//     /* per-thread setup */ for (int64_t i; items.take(i);) { /* item i */ } });
// On a 2-vCPU VM the core whose hyperthread neighbour (another tenant) is busy often runs at a third of the
// other's speed, and which one changes from minute to minute: a fixed split waits for the slow half, a counter
// lets the fast thread take over. Nested inside another parallel region, one thread takes every item.
struct WorkCounter {
  explicit WorkCounter(int64_t count) : count(count) {}
  bool take(int64_t& item) {
    item = next.fetch_add(1, std::memory_order_relaxed);
    return item < count;
  }
  const int64_t count;
  std::atomic<int64_t> next{0};
};

}  // namespace fovea

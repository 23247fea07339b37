// Helpers shared by fovea's CPU kernels: the bfloat16 load, a vectorisable exp, the work counter.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>

// The AVX-512 BF16 kernels (bf16_linear.cpp, rows_linear.cpp): code for FOVEA_BF16_TARGET functions exists where this
// is defined; Python runs them only where the CPU reports avx512_bf16. gcc 10 and clang 9 are the first to know
// the AVX-512 BF16 intrinsics.
#if defined(__x86_64__) && (defined(__clang__) ? __clang_major__ >= 9 : (defined(__GNUC__) && __GNUC__ >= 10))
#define FOVEA_AVX512_BF16 1
#include <immintrin.h>
#define FOVEA_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#endif

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

// float -> storage, in plain arithmetic so loops over them vectorise; bfloat16 rounds to nearest even, as c10
inline float round_to(float f, const float*) { return f; }
inline float round_to(float f, const c10::BFloat16*) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = ((u + 0x7fffu + ((u >> 16) & 1u)) >> 16) << 16;
  const uint32_t bits = (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc00000u : rounded;  // NaN stays NaN
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
inline void store(float* p, int64_t i, float f) { p[i] = f; }
inline void store(c10::BFloat16* p, int64_t i, float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));  // f is already rounded: the top half is the value
  reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(u >> 16);
}

// One row of RMSNorm: the float32 mean square, then x * inv rounded to the output's dtype, times the weight, rounded
// again (transformers' LlamaRMSNorm when X = W = Y; T5's layer norm reads a float32 residual stream into the weight's
// dtype). rms_norm_ and add_rms_norm_ (fused.cpp) and T5's layer norm (t5_fused.cpp) share it.
template <typename X, typename W, typename Y>
inline void rms_norm_row(const X* xr, const W* w, Y* yr, int64_t D, float eps) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < D; ++d) {
    const float v = load(xr, d);
    sum += v * v;
  }
  const float inv = 1.f / std::sqrt(sum / static_cast<float>(D) + eps);
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) store(yr, d, round_to(round_to(load(xr, d) * inv, yr) * load(w, d), yr));
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

// Bytes of a weight stream fetched ahead of the loads into L2 by the kernels that stream weights from memory at
// few rows (int8_linear.cpp, bf16_linear.cpp's 5-12 row loop; memory_read.cpp's `prefetch`): measured on Zen 4,
// 1 thread, 1 row, 12-16 KB read ~1.3x what 4 KB into L1 does, and ~2x what the hardware prefetcher alone does
// in a loop whose loads the compiler had put out of address order. With the loads in order the hardware
// prefetcher alone reads more (bf16_linear.cpp's 1-4 row loop, memory_read.cpp's head say how much).
constexpr int kWeightPrefetchBytes = 16384;

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

// Work items 0..count-1 for weight-streaming kernels: each thread owns one contiguous run of items and takes
// them from its front, so its reads are one stream through memory (the software prefetch ahead of it and the
// hardware prefetcher stay on it; with items dealt alternately, a prefetch past an item's end fetched the other
// thread's item and every item started cold). A thread whose run is done takes items from the back of the
// run with the most left, so a core slowed by its neighbour still hands its work over (as WorkCounter does).
//   RangeSplit items(n, at::get_num_threads());
//   at::parallel_for(0, items.num_ranges, 1, [&](int64_t begin, int64_t end) {
//     for (int64_t r = begin; r < end; ++r) for (int64_t i; items.take(r, i);) { /* item i */ } });
// Nested inside another parallel region, one thread runs every range in turn (and steals nothing).
struct RangeSplit {
  RangeSplit(int64_t count, int64_t ranges)
      : num_ranges(std::max<int64_t>(1, std::min(ranges, count))), bounds(new std::atomic<uint64_t>[num_ranges]) {
    for (int64_t r = 0; r < num_ranges; ++r) {
      bounds[r].store(pack(r * count / num_ranges, (r + 1) * count / num_ranges));
    }
  }
  // the next item of range `owner`, else one from the back of the fullest range; false when none is left
  bool take(int64_t owner, int64_t& item) {
    uint64_t b = bounds[owner].load(std::memory_order_relaxed);
    while (front(b) < back(b)) {
      if (bounds[owner].compare_exchange_weak(b, pack(front(b) + 1, back(b)), std::memory_order_relaxed)) {
        item = front(b);
        return true;
      }
    }
    for (;;) {
      int64_t victim = -1, most = 0;
      for (int64_t r = 0; r < num_ranges; ++r) {
        const uint64_t v = bounds[r].load(std::memory_order_relaxed);
        if (back(v) - front(v) > most) most = back(v) - front(v), victim = r;
      }
      if (victim < 0) return false;
      uint64_t v = bounds[victim].load(std::memory_order_relaxed);
      if (front(v) < back(v) &&
          bounds[victim].compare_exchange_weak(v, pack(front(v), back(v) - 1), std::memory_order_relaxed)) {
        item = back(v) - 1;
        return true;
      }
    }
  }
  const int64_t num_ranges;

 private:
  static uint64_t pack(int64_t front, int64_t back) {
    return static_cast<uint64_t>(front) << 32 | static_cast<uint64_t>(back);
  }
  static int64_t front(uint64_t v) { return static_cast<int64_t>(v >> 32); }
  static int64_t back(uint64_t v) { return static_cast<int64_t>(v & 0xFFFFFFFFu); }
  std::unique_ptr<std::atomic<uint64_t>[]> bounds;  // per range: front << 32 | back (items < 2^32)
};

}  // namespace fovea

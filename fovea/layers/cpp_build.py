"""Compile fovea's small C++ CPU kernels on first use, once per process, with a torch fallback when that fails.

Each kernel module is built by torch.utils.cpp_extension.load_inline (cached under ~/.cache/torch_extensions)
with -O3 -march=native -fno-trapping-math (without it gcc vectorises no loop that calls `exp_approx`: its floor
could raise an FP flag; fovea never reads those flags, and the values are the same). If the build fails (no
compiler, no ninja, ...) the caller gets None and uses its torch path, which computes the same thing.
FOVEA_NO_CPP_KERNELS=1 skips every kernel.
"""
from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger(__name__)

# exp(x) in plain arithmetic, so a loop that calls it vectorises (a libm call would not): exp(x) = 2^n * exp(r),
# |r| <= ln2 / 2, exp(r) by Cephes' expf polynomial, about 1 ulp in float32; x is clamped to [-87, 88], where
# 2^n stays a normal float (exp(-87) ~ 1.6e-38 and exp(88) ~ 1.7e38 stand in for 0 and inf).
EXP_APPROX = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
static inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
"""

# Element i of p as a float; bfloat16 by shifting its bits, which the compiler vectorises (c10's conversion it
# does not). Needs <torch/extension.h> (or c10/util/BFloat16.h) included first.
LOAD_AS_FLOAT = r"""
template <typename T>
static inline float load(const T* p, int64_t i) { return static_cast<float>(p[i]); }
static inline float load(const c10::BFloat16* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
"""

# Work items handed out one at a time from a shared counter, for a kernel run as
#   WorkCounter items(n);
#   at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
#     /* per-thread setup */ for (int64_t i; items.take(i);) { /* item i */ } });
# On this 2-vCPU VM the core whose hyperthread neighbour (another tenant) is busy often runs at a third of the
# other's speed, and which one changes from minute to minute: a fixed split waits for the slow half, a counter
# lets the fast thread take over. Nested inside another parallel region, one thread takes every item.
WORK_COUNTER = r"""
#include <atomic>
#include <cstdint>
struct WorkCounter {
  explicit WorkCounter(int64_t count) : count(count) {}
  bool take(int64_t& item) {
    item = next.fetch_add(1, std::memory_order_relaxed);
    return item < count;
  }
  const int64_t count;
  std::atomic<int64_t> next{0};
};
"""

_lock = threading.Lock()
_modules: dict[str, object] = {}


def load_kernels(name: str, source: str, functions: list[str], extra_cflags: tuple[str, ...] = ()):
    """The compiled module `name` (its `functions` callable from Python), or None when it cannot be built."""
    if name in _modules:  # the per-layer hot path: no lock once built
        return _modules[name]
    with _lock:
        if name in _modules:
            return _modules[name]
        module = None
        if os.environ.get("FOVEA_NO_CPP_KERNELS") != "1":
            try:
                from torch.utils.cpp_extension import load_inline

                module = load_inline(
                    name=name,
                    cpp_sources=source,
                    functions=functions,
                    extra_cflags=["-O3", "-march=native", "-fno-trapping-math", "-fopenmp", *extra_cflags],
                    extra_ldflags=["-fopenmp"],
                    verbose=False,
                )
            except Exception as err:  # the torch path computes the same thing
                logger.warning("C++ kernels %s unavailable (%s); using the torch path", name, err)
        _modules[name] = module
        return module

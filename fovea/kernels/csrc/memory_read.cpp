// A plain read of a tensor's bytes, streamed the way the weight-streaming kernels stream their packed weights:
// what `benchmarks/bandwidth.py` measures the memory-read bound with (fovea/kernels/memory_read.py says why).
//
// Same split as bf16_linear.cpp at one row: items of `chunk_bytes`, each thread one contiguous run of them
// front to back (RangeSplit), stealing from the back of the other's when done. An item is read as `streams`
// sub-ranges, a 2 KB piece (one 32-k step of a panel) from each in turn, so a core can keep several distant
// streams going at once (benchmarks/read_patterns.py compares 1, 2, 4 and 8). With `prefetch`, the kernels'
// software prefetch: every 2 KB piece the 32 lines `kWeightPrefetchBytes` ahead in its sub-range into L2
// (common.h); without, the hardware prefetcher alone. Each 64-byte line costs one AVX-512 load and a byte sum
// (VPSADBW, VPADDQ), far below what memory delivers, so the loop measures the reads, and the sum it returns
// lets a test check that every byte was read once.
//
// The loads of a piece are issued in address order, 512 bytes at a time (`kInOrder`): left free, gcc
// interleaved the 32 loads of a piece out of order, and the hardware prefetcher, which learns from the order
// the loads are issued in, then fetched so little ahead that the read ran at ~40% of the same loop in order
// (AMD EPYC Zen 4, 1 thread: 11.5 vs 26.9 GB/s; in order it reads what `torch.sum` reads).
#include <ATen/Parallel.h>

#include <vector>

#include "common.h"
#include "ops.h"

#if defined(__x86_64__) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 7))
#define FOVEA_READ_AVX512 1
#include <immintrin.h>
#define FOVEA_READ_TARGET __attribute__((target("avx512f,avx512bw")))
#endif

namespace fovea {
namespace {

constexpr int64_t kLine = 64;
constexpr int64_t kBlockBytes = 2048;  // bf16_linear.cpp's prefetch granule: one 32-k step of one panel

uint64_t sum_bytes_scalar(const uint8_t* p, int64_t n) {
  uint64_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += p[i];
  return s;
}

#ifdef FOVEA_READ_AVX512
// One 2 KB piece into 8 independent sums (with 4 over 256 bytes the same read ran at ~60% of this rate, AMD
// EPYC), 512 bytes a round; the empty asm between rounds keeps the compiler from mixing the rounds' loads
// (the file's head says why the order matters).
FOVEA_READ_TARGET inline void sum_piece(const uint8_t* piece, bool prefetch, __m512i (&acc)[8]) {
  const __m512i zero = _mm512_setzero_si512();
  if (prefetch) {
    for (int64_t line = 0; line < kBlockBytes; line += kLine) {
      _mm_prefetch(reinterpret_cast<const char*>(piece + kWeightPrefetchBytes + line), _MM_HINT_T1);
    }
  }
  for (int64_t round = 0; round < kBlockBytes; round += 8 * kLine) {
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      const __m512i v = _mm512_load_si512(reinterpret_cast<const void*>(piece + round + j * kLine));
      acc[j] = _mm512_add_epi64(acc[j], _mm512_sad_epu8(v, zero));
    }
    asm volatile("" ::: "memory");  // kInOrder
  }
}

// [p, p + n) as `streams` sub-ranges of whole pieces read round-robin, then what is left past them in order
FOVEA_READ_TARGET uint64_t sum_bytes_avx512(const uint8_t* p, int64_t n, bool prefetch, int64_t streams) {
  const int64_t head = std::min<int64_t>(n, (kLine - reinterpret_cast<uintptr_t>(p) % kLine) % kLine);
  uint64_t s = sum_bytes_scalar(p, head);
  p += head, n -= head;
  __m512i acc[8];
  for (auto& a : acc) a = _mm512_setzero_si512();
  const int64_t sub = n / streams / kBlockBytes * kBlockBytes;  // bytes of each sub-range
  for (int64_t offset = 0; offset < sub; offset += kBlockBytes) {
    for (int64_t stream = 0; stream < streams; ++stream) sum_piece(p + stream * sub + offset, prefetch, acc);
  }
  int64_t i = streams * sub;
  for (; i + kBlockBytes <= n; i += kBlockBytes) sum_piece(p + i, prefetch, acc);
  for (; i + kLine <= n; i += kLine) {
    const __m512i v = _mm512_load_si512(reinterpret_cast<const void*>(p + i));
    acc[0] = _mm512_add_epi64(acc[0], _mm512_sad_epu8(v, _mm512_setzero_si512()));
  }
  __m512i total = acc[0];
  for (int j = 1; j < 8; ++j) total = _mm512_add_epi64(total, acc[j]);
  return s + static_cast<uint64_t>(_mm512_reduce_add_epi64(total)) + sum_bytes_scalar(p + i, n - i);
}
#endif

bool has_avx512bw() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return yes;
#else
  return false;
#endif
}

}  // namespace

int64_t read_bytes(const at::Tensor& t, bool prefetch, int64_t chunk_bytes, int64_t streams) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "read_bytes reads a contiguous CPU tensor");
  TORCH_CHECK(chunk_bytes >= kBlockBytes && chunk_bytes % kBlockBytes == 0,
              "chunk_bytes must be a positive multiple of 2048, got ", chunk_bytes);
  TORCH_CHECK(streams >= 1 && streams <= 64, "streams must be 1 to 64, got ", streams);
  const auto* p = static_cast<const uint8_t*>(t.data_ptr());
  const int64_t n = static_cast<int64_t>(t.nbytes());
  if (n == 0) return 0;
  RangeSplit items((n + chunk_bytes - 1) / chunk_bytes, at::get_num_threads());
  std::vector<uint64_t> sums(items.num_ranges, 0);
  const bool vector = has_avx512bw();
  at::parallel_for(0, items.num_ranges, 1, [&](int64_t begin, int64_t end) {
    for (int64_t range = begin; range < end; ++range) {
      uint64_t s = 0;
      for (int64_t item; items.take(range, item);) {
        const int64_t size = std::min(chunk_bytes, n - item * chunk_bytes);
#ifdef FOVEA_READ_AVX512
        if (vector) {
          s += sum_bytes_avx512(p + item * chunk_bytes, size, prefetch, streams);
          continue;
        }
#endif
        s += sum_bytes_scalar(p + item * chunk_bytes, size);
      }
      sums[range] = s;
    }
  });
  uint64_t total = 0;
  for (const uint64_t s : sums) total += s;
  return static_cast<int64_t>(total);
}

}  // namespace fovea

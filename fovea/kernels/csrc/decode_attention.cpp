// A decode step's attention from a packed qkv projection in one call: rotary on q and k, k and v into the paged
// cache, paged decode of q. The same three kernels the separate calls run (rotary_, write_kv_, paged_decode), so
// the result is theirs bit for bit; what one call saves is the Python and torch ops between them, which after a
// linear layer has streamed its weights through the caches each start cold (see fovea/kernels/ops.py).
#include "ops.h"

namespace fovea {

at::Tensor rotary_paged_decode(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                               const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slot_mapping,
                               const at::Tensor& block_table, const at::Tensor& context_lens, int64_t num_heads,
                               double scale, int64_t block_size) {
  TORCH_CHECK(qkv.device().is_cpu() && k_cache.device().is_cpu(), "rotary_paged_decode runs on CPU tensors");
  TORCH_CHECK(qkv.dim() == 2 && k_cache.dim() == 3, "qkv [N, width], caches [slots, kv_heads, head_dim]");
  const int64_t N = qkv.size(0), kv_heads = k_cache.size(1), head_dim = k_cache.size(2);
  TORCH_CHECK(num_heads > 0 && num_heads % kv_heads == 0, "num_heads must be a positive multiple of kv_heads");
  TORCH_CHECK(qkv.size(1) == (num_heads + 2 * kv_heads) * head_dim, "qkv has ", qkv.size(1),
              " columns; (num_heads + 2 kv_heads) * head_dim = ", (num_heads + 2 * kv_heads) * head_dim);
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == N && context_lens.numel() == N &&
              block_table.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "one request per row: block_table [N, max_blocks] and context_lens [N], int64");
  rotary_(qkv, cos, sin, num_heads + kv_heads, head_dim);  // checks qkv's rows and cos/sin
  const int64_t q_width = num_heads * head_dim, kv_width = kv_heads * head_dim;
  write_kv_(k_cache, v_cache, slot_mapping, qkv.narrow(1, q_width, kv_width),
            qkv.narrow(1, q_width + kv_width, kv_width));  // checks slots and dtypes
  const auto q = qkv.narrow(1, 0, q_width).view({N, num_heads, head_dim});
  return paged_decode(q, k_cache, v_cache, block_table, context_lens, scale, block_size, std::nullopt)
      .view({N, q_width});
}

}  // namespace fovea

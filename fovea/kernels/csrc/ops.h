// Every function the extension exposes; bindings.cpp registers them with Python.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace fovea {

// fused.cpp: element-wise parts of a decoder layer (and its KV-cache write), and the sampler's argmax
at::Tensor rms_norm(const at::Tensor& x, at::Tensor weight, double eps);
at::Tensor add_rms_norm_(const at::Tensor& x, const at::Tensor& residual, at::Tensor weight, double eps);
void write_kv_(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slot_mapping,
               const at::Tensor& k, const at::Tensor& v);
void rotary_(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t heads, int64_t head_dim);
at::Tensor silu_mul(const at::Tensor& gate_up);
at::Tensor first_argmax(const at::Tensor& values);

// t5_fused.cpp: T5's layer norm (float32 residual stream, output in the weight's dtype), Flan-T5's gated tanh-GELU
at::Tensor t5_layer_norm(const at::Tensor& x, at::Tensor weight, double eps);
at::Tensor gelu_tanh_mul(const at::Tensor& a, const at::Tensor& b);

// paged_attention.cpp: decode attention straight from the paged KV cache
at::Tensor paged_decode(at::Tensor q, const at::Tensor& k_cache, const at::Tensor& v_cache, at::Tensor block_table,
                        at::Tensor context_lens, double scale, int64_t block_size,
                        const std::optional<at::Tensor>& bias);

// decode_attention.cpp: rotary + KV-cache write + paged decode of a packed qkv, one call per layer and step
at::Tensor rotary_paged_decode(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                               const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slot_mapping,
                               const at::Tensor& block_table, const at::Tensor& context_lens, int64_t num_heads,
                               double scale, int64_t block_size);

// encoder_attention.cpp: attention over variable-length segments on AVX-512 BF16, bidirectional (ViTs' encoders)
// or causal bottom-right (a decoder's prefill), grouped-query when k and v have fewer heads
bool encoder_attention_compiled();
at::Tensor encoder_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, double scale,
                             bool causal);

// amx_linear.cpp: bfloat16 linear on Intel AMX tiles
bool amx_compiled();
bool enable_amx();
at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias);

// bf16_linear.cpp: bfloat16 linear on AVX-512 BF16, the AMX kernel's panel layout (decode, and prefill without AMX)
bool bf16_linear_compiled();
// madvise(MADV_HUGEPAGE) on the 2 MiB pages inside t's memory, before anything touches them: whether Linux took it
bool advise_huge_pages(const at::Tensor& t);
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                       const std::optional<at::Tensor>& bias);

// rows_linear.cpp: bfloat16 linear on AVX-512 BF16 reading row-major W [n_i, K] pieces as they are (views of a mapped
// checkpoint), stacked along N in the given order
bool rows_linear_compiled();
at::Tensor rows_linear(const at::Tensor& x, const std::vector<at::Tensor>& sources, int64_t out_features,
                       const std::optional<at::Tensor>& bias);

// weight_pack.cpp: W [N, K] (2-byte elements, contiguous rows) into the bfloat16 kernels' panel layout
// [N'/32, K'/32, 2, 16, 16, 2], zeros past N and K (fovea/kernels/panels.py)
void pack_panels_(const at::Tensor& packed, const at::Tensor& weight);

// int8_linear.cpp: int8 weight-only linear (W8A16) on AVX-512 BF16, W8A8 on AVX-512 VNNI
bool int8_linear_compiled();
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias);
at::Tensor int8_dynamic_linear(const at::Tensor& qx, const at::Tensor& x_scale, const at::Tensor& packed,
                               const at::Tensor& compensation, int64_t out_features, const at::Tensor& scale,
                               const std::optional<at::Tensor>& bias, at::ScalarType out_dtype);

// memory_read.cpp: the bytes of t read as the weight-streaming kernels read their weights (the memory-read bound);
// returns their sum, so a caller can check every byte was read once
int64_t read_bytes(const at::Tensor& t, bool prefetch, int64_t chunk_bytes, int64_t streams);

}  // namespace fovea

// The Python module: one extension for every kernel (built by fovea/kernels/build.py).
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace pybind11::literals;
  m.def("rms_norm", &fovea::rms_norm, "x"_a, "weight"_a, "eps"_a);
  m.def("add_rms_norm_", &fovea::add_rms_norm_, "x"_a, "residual"_a, "weight"_a, "eps"_a);
  m.def("write_kv_", &fovea::write_kv_, "k_cache"_a, "v_cache"_a, "slot_mapping"_a, "k"_a, "v"_a);
  m.def("rotary_", &fovea::rotary_, "x"_a, "cos"_a, "sin"_a, "heads"_a, "head_dim"_a);
  m.def("silu_mul", &fovea::silu_mul, "gate_up"_a);
  m.def("first_argmax", &fovea::first_argmax, "values"_a);
  m.def("t5_layer_norm", &fovea::t5_layer_norm, "x"_a, "weight"_a, "eps"_a);
  m.def("gelu_tanh_mul", &fovea::gelu_tanh_mul, "a"_a, "b"_a);
  m.def("paged_decode", &fovea::paged_decode, "q"_a, "k_cache"_a, "v_cache"_a, "block_table"_a, "context_lens"_a,
        "scale"_a, "block_size"_a, "bias"_a = pybind11::none());
  m.def("rotary_paged_decode", &fovea::rotary_paged_decode, "qkv"_a, "cos"_a, "sin"_a, "k_cache"_a, "v_cache"_a,
        "slot_mapping"_a, "block_table"_a, "context_lens"_a, "num_heads"_a, "scale"_a, "block_size"_a);
  m.def("encoder_attention_compiled", &fovea::encoder_attention_compiled);
  m.def("encoder_attention", &fovea::encoder_attention, "q"_a, "k"_a, "v"_a, "cu_seqlens_q"_a, "cu_seqlens_k"_a,
        "scale"_a, "causal"_a = false);
  m.def("amx_compiled", &fovea::amx_compiled);
  m.def("enable_amx", &fovea::enable_amx);
  m.def("amx_linear", &fovea::amx_linear, "x"_a, "packed"_a, "bias"_a);
  m.def("bf16_linear_compiled", &fovea::bf16_linear_compiled);
  m.def("advise_huge_pages", &fovea::advise_huge_pages, "t"_a);
  m.def("bf16_linear", &fovea::bf16_linear, "x"_a, "packed"_a, "out_features"_a, "bias"_a);
  m.def("rows_linear_compiled", &fovea::rows_linear_compiled);
  m.def("rows_linear", &fovea::rows_linear, "x"_a, "sources"_a, "out_features"_a, "bias"_a);
  m.def("pack_panels_", &fovea::pack_panels_, "packed"_a, "weight"_a);
  m.def("read_bytes", &fovea::read_bytes, "t"_a, "prefetch"_a, "chunk_bytes"_a, "streams"_a);
  m.def("int8_linear_compiled", &fovea::int8_linear_compiled);
  m.def("int8_linear", &fovea::int8_linear, "x"_a, "packed"_a, "out_features"_a, "scale"_a, "bias"_a);
  m.def("int8_dynamic_linear", &fovea::int8_dynamic_linear, "qx"_a, "x_scale"_a, "packed"_a, "compensation"_a,
        "out_features"_a, "scale"_a, "bias"_a, "out_dtype"_a);
}

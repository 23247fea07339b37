"""A decode-only step through the layers of Llama's family (Llama, Qwen2, Qwen2.5-VL's LM, Mistral) as one Python
loop of extension calls: `DecodePlan`.

Why: single-stream decode streams ~30 MB of weights per layer through the caches, so every Python call and torch
op between two linear layers starts cold (fovea/kernels/ops.py has the measurement), and a layer made ~40 of them
between its 8 kernel calls (module `__call__`s, the linear methods' and kernels' wrappers, their checks): ~220 us
per layer on the AMD EPYC, ~5 ms of a ~32 ms step. Here a layer is the same 8 calls into the extension, with
nothing between them but the loop: `rms_norm` / `add_rms_norm_`, `bf16_linear` (qkv), `rotary_paged_decode`,
`bf16_linear` (o), `add_rms_norm_`, `bf16_linear` (gate/up), `silu_mul`, `bf16_linear` (down), with the same
arguments the modules pass, so the same bits (`tests/models/test_llama_decode.py` checks every output and the KV
cache written, bit for bit).

When: `LlamaModel.forward` takes it for a decode-only step (one query token per request, the C++ decode kernels
in the metadata's single group) when every layer it runs has fovea's AVX-512 BF16 linear method on all four
projections (`BF16LinearMethod` on packed panels or `BF16RowsLinearMethod` on the checkpoint's own pages, in
any mix: no LoRA, no int8, no AMX, no tensor parallelism), SiLU, bfloat16 norms and a
bound KV cache; anything else runs the modules. Which one a model runs is decided once, at its first decode step
after loading, and shown in `repr(model.model)` (`decode=...`). `LlamaModel.fused_decode = False` turns it off
(forward hooks on the modules, which it does not call, see every call again: benchmarks/roofline_phases.py).
"""
from __future__ import annotations

import torch

from fovea import kernels
from fovea.kernels import bf16_linear
from fovea.layers.attention import AttentionMetadata
from fovea.layers.linear_methods import BF16LinearMethod, BF16RowsLinearMethod
from fovea.layers.norms import RMSNorm
from fovea.layers.rotary_attention import RotaryQKVAttention


def _linear(module, ext) -> tuple | None:
    """(kernel, weight, out_features, float32 bias or None) of a linear layer on one of fovea's AVX-512 BF16
    methods: the extension's call and the arguments the method's `apply` passes it, so the same bits."""
    if getattr(module, "tp_size", 1) != 1:
        return None
    if type(module.method) is BF16LinearMethod:
        return ext.bf16_linear, module.packed_weight, module.out_features, module.panel_bias
    if type(module.method) is BF16RowsLinearMethod:
        return ext.rows_linear, module.rows_sources, module.out_features, module.rows_bias
    return None


def _is_plain_norm(norm) -> bool:
    return type(norm) is RMSNorm and norm.weight.dtype == torch.bfloat16


class DecodePlan:
    """The tensors and sizes each layer's extension calls take, gathered once (`build`); `run` is the loop."""

    __slots__ = ("layers", "ext")

    def __init__(self, layers: list[tuple], ext):
        self.layers = layers
        self.ext = ext

    @classmethod
    def build(cls, layers) -> DecodePlan | None:
        """The plan of these decoder layers, or None when one of them needs its modules (the docstring above)."""
        ext = kernels.extension()
        if ext is None or not bf16_linear.available():  # rows_linear runs where bf16_linear does (same ISA)
            return None
        entries = []
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = [_linear(m, ext) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            core = attn.attn
            if any(entry is None for entry in linears) or not mlp.is_silu or type(core) is not RotaryQKVAttention \
                    or not core.use_kernel or core.kv_cache is None or core.kv_cache[0].dtype != torch.bfloat16 \
                    or not (_is_plain_norm(layer.input_layernorm) and _is_plain_norm(layer.post_attention_layernorm)) \
                    or layer.input_layernorm.eps != layer.post_attention_layernorm.eps:
                return None
            entries.append((layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                            layer.input_layernorm.eps, *linears, core, core.num_heads, core.scale))
        return cls(entries, ext)

    @staticmethod
    def takes(x: torch.Tensor) -> bool:
        """x is what `run` reads: bfloat16 [B, hidden] with contiguous rows, outside autograd."""
        return x.dtype == torch.bfloat16 and x.dim() == 2 and x.stride(1) == 1 and not x.requires_grad

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, hidden] bfloat16 (rows contiguous) through every layer: (the last MLP output, the residual
        stream), as the modules' loop returns them. cos, sin [B, head_dim]; `meta` a decode-only step's."""
        ext = self.ext
        rms_norm, add_rms_norm_ = ext.rms_norm, ext.add_rms_norm_
        attend, silu_mul = ext.rotary_paged_decode, ext.silu_mul
        group = meta.groups[0]
        slots, table, context, block_size = meta.slot_mapping, group.block_table, group.context_lens, meta.block_size
        residual = None
        for norm1, norm2, eps, (qkv_fn, qkv, qkv_n, qkv_b), (o_fn, o, o_n, o_b), \
                (gate_up_fn, gate_up, gate_up_n, gate_up_b), (down_fn, down, down_n, down_b), \
                core, num_heads, scale in self.layers:
            if residual is None:  # the first layer: its input is the residual stream
                h, residual = rms_norm(x, norm1, eps), x
            else:  # x += residual in place (x is the previous MLP's fresh output): the stream
                h, residual = add_rms_norm_(x, residual, norm1, eps), x
            k_cache, v_cache = core.kv_cache
            a = attend(qkv_fn(h, qkv, qkv_n, qkv_b), cos, sin, k_cache, v_cache, slots, table, context, num_heads,
                       scale, block_size)
            x = o_fn(a, o, o_n, o_b)
            h, residual = add_rms_norm_(x, residual, norm2, eps), x
            x = down_fn(silu_mul(gate_up_fn(h, gate_up, gate_up_n, gate_up_b)), down, down_n, down_b)
        return x, residual


def is_decode_only(meta) -> bool:
    """A decode-only step's paged metadata: one group of single-token queries, every row read (no
    `output_group`)."""
    return type(meta) is AttentionMetadata and len(meta.groups) == 1 and meta.groups[0].is_decode \
        and meta.output_group is None

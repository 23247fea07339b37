"""Self-attention over a decoder's packed q/k/v projection with rotary q and k (Llama's family, Qwen2's LM).

`RotaryQKVAttention` is `Attention` (paged or dense, the same KV cache and metadata) that takes the packed row
qkv [N, (num_heads + 2 * num_kv_heads) * head_dim] and the step's rotary cos/sin [N, head_dim] instead of three
tensors: it rotates the q and k heads (`apply_rotary_packed`), splits, and attends.

In a decode-only step with the C++ kernels on, rotation, the KV-cache write and the paged decode are one kernel
call (`fovea.kernels.rotary_paged_decode`, the same three kernels the separate path runs, so the same bits): the
attention sits between the qkv and o linear layers, which stream their weights through the caches, and each
Python or torch op in that gap starts cold (`fovea/kernels/ops.py` has the measurement).
"""
from __future__ import annotations

import torch

from fovea import kernels
from fovea.layers.attention import Attention, AttentionMetadata, get_attention_metadata
from fovea.layers.rotary import apply_rotary_packed


class RotaryQKVAttention(Attention):
    def forward(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # qkv [N, (nh + 2 nkv) * hs]; cos, sin [N, hs] -> [N, nh * hs]
        meta = get_attention_metadata()
        if type(meta) is AttentionMetadata and self.kv_cache is not None and len(meta.groups) == 1 \
                and meta.groups[0].is_decode and self.use_kernel and kernels.is_available() \
                and qkv.dtype == self.kv_cache[0].dtype and not qkv.requires_grad:
            group = meta.groups[0]
            k_cache, v_cache = self.kv_cache
            return kernels.rotary_paged_decode(qkv, cos, sin, k_cache, v_cache, meta.slot_mapping, group.block_table,
                                               group.context_lens, self.num_heads, self.scale, meta.block_size)
        return super().forward(*self._rotated_split(qkv, cos, sin))

    def forward_rows(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Every row's K/V into the cache, attention for the step's output rows only (`Attention.forward_rows`):
        qkv [N, ...] -> [len(output rows), nh * hs]."""
        return super().forward_rows(*self._rotated_split(qkv, cos, sin))

    def _rotated_split(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        qkv = apply_rotary_packed(qkv, cos, sin, self.num_heads + self.num_kv_heads)
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return qkv.split([q_width, kv_width, kv_width], dim=-1)

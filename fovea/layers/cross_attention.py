"""Cross-attention of an encoder-decoder model's decoder over its encoder's output, paged like self-attention.

The encoder runs once per request; each decoder layer projects its output to keys/values once and writes
them into *cross blocks*: blocks of the same pool (and the same per-layer cache tensors) as the decoder's
self-attention KV, held by the request for its life (fovea.engine.kv_cache: `allocate_cross_blocks`). Every
decoder step then attends, without a causal mask, over the first `encoder_len` slots of the request's cross
block table. One-token queries of a step share one call (fovea's paged decode kernel: attending to every slot
below a length is exactly non-causal attention for a single query); a longer query run gets its own.

Dense use (no `AttentionMetadata` in the context: tests, training): forward(q, k, v) over given sequences.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fovea import kernels
from fovea.layers.attention import Attention, AttentionGroup, AttentionMetadata, get_attention_metadata


def build_cross_attention_metadata(query_lens: list[int], encoder_lens: list[int], cross_block_tables: list[list[int]],
                                   block_size: int) -> AttentionMetadata:
    """Cross-attention metadata of one step: request i's `query_lens[i]` decoder tokens (flat, in request
    order) attend to all `encoder_lens[i]` encoder positions held in `cross_block_tables[i]`."""
    num_reqs = len(query_lens)
    blocks_needed = [-(-n // block_size) for n in encoder_lens]
    for q_len, enc_len, table, n in zip(query_lens, encoder_lens, cross_block_tables, blocks_needed):
        if q_len < 1 or enc_len < 1 or len(table) < n:
            raise ValueError(f"bad cross-attention geometry: query {q_len}, encoder {enc_len}, blocks {len(table)}")
    q_len = torch.tensor(query_lens, dtype=torch.long)
    enc_len = torch.tensor(encoder_lens, dtype=torch.long)
    q_starts = torch.cumsum(q_len, 0) - q_len
    is_decode = q_len == 1
    groups = []
    decode_rows = is_decode.nonzero().flatten().tolist()
    row_sets = ([decode_rows] if decode_rows else []) + [[i] for i in (~is_decode).nonzero().flatten().tolist()]
    for rows in row_sets:
        max_q = int(q_len[rows].max())
        max_blocks = max(blocks_needed[i] for i in rows)
        table = torch.tensor([cross_block_tables[i][:blocks_needed[i]] + [0] * (max_blocks - blocks_needed[i])
                              for i in rows], dtype=torch.long)
        lens = enc_len[rows]
        q_rows = torch.arange(max_q)
        is_real = q_rows[None, :] < q_len[rows][:, None]  # [B, max_q]
        start = q_starts[rows]
        q_index = torch.where(is_real, start[:, None] + q_rows[None, :], start[:, None])
        key_pos = torch.arange(max_blocks * block_size)
        # every query row of a request sees all of its encoder positions and nothing past them
        mask = (key_pos[None, :] < lens[:, None])[:, None, None, :].expand(-1, 1, max_q, -1)
        flat_rows = (torch.arange(len(rows))[:, None] * max_q + q_rows[None, :])[is_real]
        groups.append(AttentionGroup(q_index=q_index, block_table=table, mask=mask, out_index=flat_rows,
                                     token_index=q_index[is_real], context_lens=lens, is_decode=max_q == 1))
    return AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), groups=groups,
                             num_tokens=int(q_len.sum()) if num_reqs else 0, block_size=block_size)


class CrossAttention(nn.Module):
    """Non-causal attention of decoder queries over encoder keys/values stored in `self_attention`'s cache.

    `self_attention` is the same decoder layer's paged `Attention`: cross K/V live in its cache tensors (the
    two have the same heads and head size), so the pool counts one kind of block. It is held outside the
    module tree (not a submodule twice).
    """

    def __init__(self, self_attention: Attention, scale: float):
        super().__init__()
        self._self_attention = (self_attention,)
        self.num_heads = self_attention.num_heads
        self.num_kv_heads = self_attention.num_kv_heads
        self.head_dim = self_attention.head_dim
        self.scale = scale

    @property
    def kv_cache(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self._self_attention[0].kv_cache

    def store(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write encoder keys/values k, v [M, num_kv_heads * head_dim] into the cross slots `slot_mapping` [M]."""
        k_cache, v_cache = self.kv_cache
        shape = (k.shape[0], self.num_kv_heads, self.head_dim)
        k_cache.index_copy_(0, slot_mapping, k.view(shape).to(k_cache.dtype))
        v_cache.index_copy_(0, slot_mapping, v.view(shape).to(v_cache.dtype))

    def forward(self, q: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
        meta = get_attention_metadata()
        if not isinstance(meta, AttentionMetadata):
            if k is None or v is None:
                raise ValueError("dense cross-attention needs the encoder's keys and values")
            return self._forward_dense(q, k, v)
        cross = meta.cross
        if cross is None:
            raise RuntimeError("an encoder-decoder step runs with cross-attention metadata (AttentionMetadata.cross)")
        k_cache, v_cache = self.kv_cache
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        bs = cross.block_size
        groups = cross.groups
        use_kernel = kernels.is_available() and self.num_kv_heads == self.num_heads
        if len(groups) == 1 and groups[0].is_decode and use_kernel:
            # a decode-only step: its rows are already in token order, one kernel call and nothing else
            g = groups[0]
            return kernels.paged_decode(q, k_cache, v_cache, g.block_table, g.context_lens, self.scale, bs
                                        ).view(num_tokens, -1).to(q.dtype)
        out = q.new_empty(num_tokens, self.num_heads * self.head_dim)
        k_blocks = k_cache.view(-1, bs, self.num_kv_heads, self.head_dim)
        v_blocks = v_cache.view(-1, bs, self.num_kv_heads, self.head_dim)
        for g in groups:
            num_reqs = g.block_table.shape[0]
            if g.is_decode and use_kernel:
                og = kernels.paged_decode(q[g.token_index], k_cache, v_cache, g.block_table, g.context_lens,
                                          self.scale, bs)  # (B, nh, hs)
                out[g.token_index] = og.reshape(num_reqs, -1).to(out.dtype)
                continue
            qg = q[g.q_index].transpose(1, 2)  # (B, nh, max_q, hs)
            kg = k_blocks[g.block_table].view(num_reqs, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
            vg = v_blocks[g.block_table].view(num_reqs, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
            og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, scale=self.scale,
                                                enable_gqa=self.num_kv_heads != self.num_heads)
            out[g.token_index] = og.transpose(1, 2).reshape(-1, self.num_heads * self.head_dim)[g.out_index]
        return out

    def _forward_dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q [B, Lq, width] (or [Lq, width]), k, v [B, Lk, width]: every query sees every key
        squeeze = q.dim() == 2
        if squeeze:
            q, k, v = q[None], k[None], v[None]
        batch = q.shape[0]
        q4 = q.view(batch, q.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        k4 = k.view(batch, k.shape[1], self.num_kv_heads, self.head_dim).transpose(1, 2)
        v4 = v.view(batch, v.shape[1], self.num_kv_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q4, k4, v4, scale=self.scale,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        out = out.transpose(1, 2).reshape(batch, q.shape[1], -1)
        return out[0] if squeeze else out

"""Paged attention over the engine's flat batch, and the per-step context that carries its metadata.

The runner builds one `AttentionMetadata` per step and enters `forward_context(meta)`; every `Attention`
layer reads it from there, so model code keeps `forward(input_ids, positions)`.

KV cache layout per layer: two tensors `[num_slots, num_kv_heads, head_dim]`, `num_slots = num_blocks *
block_size`; token `t` of a request lives in slot `block_table[t // block_size] * block_size + t % block_size`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(slots=True)
class AttentionGroup:
    """Requests attended together in one SDPA call (all decodes, or one prefill chunk).

    q_index:   [B, max_q] long, flat token index of each query row (padding rows point at a real token).
    kv_slots:  [B, max_ctx] long, KV slot of each key position (padding points at slot 0).
    mask:      [B, 1, max_q, max_ctx] bool, True = may attend; None = every key visible to every query.
    out_index: [n] long, rows of the flattened [B * max_q] output that are real tokens, in flat-token order
               of `token_index`.
    token_index: [n] long, flat token indices this group produces.
    """

    q_index: torch.Tensor
    kv_slots: torch.Tensor
    mask: torch.Tensor | None
    out_index: torch.Tensor
    token_index: torch.Tensor


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [N] long: the KV slot each scheduled token is written to
    groups: list[AttentionGroup]
    num_tokens: int


_CONTEXT: list[AttentionMetadata] = []


@contextlib.contextmanager
def forward_context(meta: AttentionMetadata):
    _CONTEXT.append(meta)
    try:
        yield meta
    finally:
        _CONTEXT.pop()


def get_attention_metadata() -> AttentionMetadata:
    if not _CONTEXT:
        raise RuntimeError("Attention layers run inside fovea.layers.attention.forward_context(meta)")
    return _CONTEXT[-1]


def _group(query_lens, context_lens, slot_rows, q_starts) -> AttentionGroup:
    """One batched group. slot_rows[i] lists the KV slots of request i's first context_lens[i] tokens."""
    num_reqs = len(query_lens)
    max_q, max_ctx = max(query_lens), max(context_lens)
    q_index = torch.zeros(num_reqs, max_q, dtype=torch.long)
    kv_slots = torch.zeros(num_reqs, max_ctx, dtype=torch.long)
    q_pos = torch.arange(max_q).unsqueeze(1)  # [max_q, 1]
    k_pos = torch.arange(max_ctx).unsqueeze(0)  # [1, max_ctx]
    mask = torch.zeros(num_reqs, 1, max_q, max_ctx, dtype=torch.bool)
    out_index, token_index = [], []
    for i, (q_len, ctx_len, slots, start) in enumerate(zip(query_lens, context_lens, slot_rows, q_starts)):
        q_index[i, :q_len] = torch.arange(start, start + q_len)
        q_index[i, q_len:] = start
        kv_slots[i, :ctx_len] = torch.as_tensor(slots[:ctx_len], dtype=torch.long)
        # query row r sits at absolute position ctx_len - q_len + r and sees keys up to it
        visible = (k_pos <= q_pos + (ctx_len - q_len)) & (k_pos < ctx_len)
        visible[q_len:] = False
        visible[q_len:, 0] = True  # padding rows attend to something so SDPA stays finite
        mask[i, 0] = visible
        out_index.extend(range(i * max_q, i * max_q + q_len))
        token_index.extend(range(start, start + q_len))
    needs_mask = not (max_q == 1 and all(c == max_ctx for c in context_lens))
    return AttentionGroup(
        q_index=q_index,
        kv_slots=kv_slots,
        mask=mask if needs_mask else None,
        out_index=torch.tensor(out_index, dtype=torch.long),
        token_index=torch.tensor(token_index, dtype=torch.long),
    )


def build_attention_metadata(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
) -> AttentionMetadata:
    """Metadata for one step.

    For request i, `query_lens[i]` tokens are scheduled (they are its last ones), `context_lens[i]` is its
    length once they are computed (cached prefix + these), and `block_tables[i]` holds enough blocks for it.
    Scheduled tokens are laid out flat in request order. Decodes (one query token) share one SDPA call;
    each longer chunk gets its own, so nothing is padded to the longest prompt.
    """
    slot_rows, q_starts, slot_mapping = [], [], []
    start = 0
    for q_len, ctx_len, table in zip(query_lens, context_lens, block_tables):
        if q_len > ctx_len or len(table) * block_size < ctx_len:
            raise ValueError(f"bad request geometry: query {q_len}, context {ctx_len}, blocks {len(table)}")
        slots = [table[t // block_size] * block_size + t % block_size for t in range(ctx_len)]
        slot_rows.append(slots)
        slot_mapping.extend(slots[ctx_len - q_len:])
        q_starts.append(start)
        start += q_len
    decodes = [i for i, q in enumerate(query_lens) if q == 1]
    chunks = [i for i, q in enumerate(query_lens) if q > 1]
    groups = []
    if decodes:
        groups.append(_group(*[[seq[i] for i in decodes] for seq in (query_lens, context_lens, slot_rows, q_starts)]))
    for i in chunks:
        groups.append(_group([query_lens[i]], [context_lens[i]], [slot_rows[i]], [q_starts[i]]))
    return AttentionMetadata(
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.long), groups=groups, num_tokens=start
    )


class Attention(nn.Module):
    """Causal self-attention against the paged KV cache.

    forward(q [N, num_heads*head_dim], k, v [N, num_kv_heads*head_dim]) -> [N, num_heads*head_dim].
    The runner binds `self.kv_cache = (k_cache, v_cache)` after allocating the pool.
    """

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta = get_attention_metadata()
        if self.kv_cache is None:
            raise RuntimeError("KV cache not bound to this attention layer")
        k_cache, v_cache = self.kv_cache
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k_cache.index_copy_(0, meta.slot_mapping, k.view(num_tokens, self.num_kv_heads, self.head_dim).to(k_cache.dtype))
        v_cache.index_copy_(0, meta.slot_mapping, v.view(num_tokens, self.num_kv_heads, self.head_dim).to(v_cache.dtype))
        out = q.new_empty(num_tokens, self.num_heads * self.head_dim)
        for g in meta.groups:
            qg = q[g.q_index].transpose(1, 2)  # (B, nh, max_q, hs)
            kg = k_cache[g.kv_slots].transpose(1, 2)  # (B, nkv, max_ctx, hs)
            vg = v_cache[g.kv_slots].transpose(1, 2)
            og = F.scaled_dot_product_attention(
                qg, kg, vg, attn_mask=g.mask, scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads
            )  # (B, nh, max_q, hs)
            og = og.transpose(1, 2).reshape(-1, self.num_heads * self.head_dim)
            out[g.token_index] = og[g.out_index]
        return out

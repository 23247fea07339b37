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

from fovea.layers import paged_attention_cpu


@dataclass(slots=True)
class AttentionGroup:
    """Requests attended together in one SDPA call (all decodes, or one prefill chunk).

    q_index:     [B, max_q] long, flat token index of each query row (padding rows repeat a real token).
    block_table: [B, max_blocks] long, KV blocks of each request (padding points at block 0, kept zero).
    mask:        [B, 1, max_q, max_blocks * block_size] bool, True = may attend; None = no masking needed.
    out_index:   [n] long, rows of the flattened [B * max_q] output that are real tokens.
    token_index: [n] long, the flat token index each of those rows is written to.
    """

    q_index: torch.Tensor
    block_table: torch.Tensor
    mask: torch.Tensor | None
    out_index: torch.Tensor
    token_index: torch.Tensor
    context_lens: torch.Tensor  # [B] long
    is_decode: bool  # one query token per request


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [N] long: the KV slot each scheduled token is written to
    groups: list[AttentionGroup]
    num_tokens: int
    block_size: int


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


def _group(query_lens: list[int], context_lens: list[int], tables: list[list[int]], q_starts: list[int],
           block_size: int) -> AttentionGroup:
    num_reqs = len(query_lens)
    max_q = max(query_lens)
    max_blocks = max(-(-c // block_size) for c in context_lens)
    q_len = torch.tensor(query_lens)
    ctx_len = torch.tensor(context_lens)
    start = torch.tensor(q_starts)
    rows = torch.arange(max_q)
    is_real = rows[None, :] < q_len[:, None]  # [B, max_q]
    q_index = torch.where(is_real, start[:, None] + rows[None, :], start[:, None])
    block_table = torch.zeros(num_reqs, max_blocks, dtype=torch.long)
    for i, table in enumerate(tables):
        n = -(-context_lens[i] // block_size)
        block_table[i, :n] = torch.tensor(table[:n])
    mask = None
    key_pos = torch.arange(max_blocks * block_size)
    if not (max_q == 1 and all(c == max_blocks * block_size for c in context_lens)):
        # query row r sits at absolute position ctx_len - q_len + r and sees keys up to it
        limit = (ctx_len - q_len)[:, None] + rows[None, :]  # [B, max_q]
        mask = key_pos[None, None, :] <= limit[:, :, None]
        mask[:, :, 0] |= ~is_real  # padding rows attend to something so SDPA stays finite
        mask = mask.unsqueeze(1)
    flat_rows = (torch.arange(num_reqs)[:, None] * max_q + rows[None, :])[is_real]
    return AttentionGroup(q_index=q_index, block_table=block_table, mask=mask,
                          out_index=flat_rows, token_index=q_index[is_real], context_lens=ctx_len,
                          is_decode=max_q == 1)


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
    slot_parts, q_starts = [], []
    start = 0
    for q_len, ctx_len, table in zip(query_lens, context_lens, block_tables):
        if q_len > ctx_len or len(table) * block_size < ctx_len:
            raise ValueError(f"bad request geometry: query {q_len}, context {ctx_len}, blocks {len(table)}")
        pos = torch.arange(ctx_len - q_len, ctx_len)
        blocks = torch.tensor(table[(ctx_len - q_len) // block_size:(ctx_len - 1) // block_size + 1])
        slot_parts.append(blocks[pos // block_size - (ctx_len - q_len) // block_size] * block_size + pos % block_size)
        q_starts.append(start)
        start += q_len
    decodes = [i for i, q in enumerate(query_lens) if q == 1]
    chunks = [i for i, q in enumerate(query_lens) if q > 1]
    groups = []
    if decodes:
        pick = lambda seq: [seq[i] for i in decodes]  # noqa: E731
        groups.append(_group(pick(query_lens), pick(context_lens), pick(block_tables), pick(q_starts), block_size))
    for i in chunks:
        groups.append(_group([query_lens[i]], [context_lens[i]], [block_tables[i]], [q_starts[i]], block_size))
    slot_mapping = torch.cat(slot_parts) if slot_parts else torch.zeros(0, dtype=torch.long)
    return AttentionMetadata(slot_mapping=slot_mapping, groups=groups, num_tokens=start, block_size=block_size)


class Attention(nn.Module):
    """Causal self-attention against the paged KV cache.

    forward(q [N, num_heads*head_dim], k, v [N, num_kv_heads*head_dim]) -> [N, num_heads*head_dim].
    The runner binds `self.kv_cache = (k_cache, v_cache)` after allocating the pool.
    """

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int | None = None,
                 use_kernel: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._kernel = paged_attention_cpu.load() if use_kernel else None

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
        bs = meta.block_size
        k_blocks = k_cache.view(-1, bs, self.num_kv_heads, self.head_dim)
        v_blocks = v_cache.view(-1, bs, self.num_kv_heads, self.head_dim)
        for g in meta.groups:
            num_reqs = g.block_table.shape[0]
            if g.is_decode and self._kernel is not None:
                og = self._kernel.paged_decode(q[g.token_index], k_cache, v_cache, g.block_table, g.context_lens,
                                               self.scale, bs)  # (B, nh, hs), straight from the pool
                out[g.token_index] = og.reshape(num_reqs, -1).to(out.dtype)
                continue
            qg = q[g.q_index].transpose(1, 2)  # (B, nh, max_q, hs)
            # whole blocks at a time: one contiguous copy per block instead of one per token
            kg = k_blocks[g.block_table].view(num_reqs, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
            vg = v_blocks[g.block_table].view(num_reqs, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
            og = F.scaled_dot_product_attention(
                qg, kg, vg, attn_mask=g.mask, scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads
            )  # (B, nh, max_q, hs)
            og = og.transpose(1, 2).reshape(-1, self.num_heads * self.head_dim)
            out[g.token_index] = og[g.out_index]
        return out

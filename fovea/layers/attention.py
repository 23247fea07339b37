"""Causal attention for decoders: paged over the engine's flat batch, or plain over the given sequences.

The runner builds one `AttentionMetadata` per step and enters `forward_context(meta)`; every `Attention`
layer reads it from there, so model code keeps `forward(input_ids, positions)`. Training and export run the
same modules without a KV cache: under `forward_context(DenseAttentionMetadata(mask))` for a padded batch
[B, L, ...], or outside any context for one sequence (causal SDPA over the tokens given, nothing cached).

KV cache layout per layer: two tensors `[num_slots, num_kv_heads, head_dim]`, `num_slots = num_blocks *
block_size`; token `t` of a request lives in slot `block_table[t // block_size] * block_size + t % block_size`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fovea import kernels
from fovea.layers import prefill_attention


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
    fresh_range: tuple[int, int] | None = None
    """(first token, count) when the group is one request's whole context (no cached prefix): its keys are
    its own scheduled tokens, so attention is plain causal SDPA over them, with no gather from the cache."""
    query_positions: torch.Tensor | None = None
    """[B, max_q] long, the absolute position of each query row in its request (padding rows run past the
    context): what a relative position bias (T5) is computed from."""


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [N] long: the KV slot each scheduled token is written to
    groups: list[AttentionGroup]
    num_tokens: int
    block_size: int
    # encoder-decoder models: the same step's cross-attention over each request's encoder K/V blocks
    # (fovea.layers.cross_attention); None for decoder-only models
    cross: AttentionMetadata | None = None
    # the rows whose final hidden state the step reads (its logits rows: each the last scheduled token of its
    # request, in request order), as a one-query-per-request group; None: every row. A model that declares
    # `SupportsOutputRows` runs its last layer past the q/k/v projection on these rows only (`Attention.forward_rows`)
    output_group: AttentionGroup | None = None


@dataclass(slots=True)
class DenseAttentionMetadata:
    """No KV cache: each sequence of the batch attends to its own tokens (training, export).

    mask: [B, 1, L, L] bool "may attend" for inputs [B, L, ...] (`from_padding` builds the causal + padding
    one); None: plain causal attention over every sequence, all tokens real.
    """

    mask: torch.Tensor | None = None

    @staticmethod
    def from_padding(attention_mask: torch.Tensor) -> DenseAttentionMetadata:
        """attention_mask [B, L], 1 = real token: each row attends to earlier-or-same real tokens. Every row
        also sees itself, so a padding row is never empty (its output is unused); left or right padding."""
        length = attention_mask.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
        keys = attention_mask.bool()[:, None, None, :] | torch.eye(length, dtype=torch.bool, device=causal.device)
        return DenseAttentionMetadata(causal[None, None] & keys)


_CONTEXT: list[AttentionMetadata | DenseAttentionMetadata] = []


@contextlib.contextmanager
def forward_context(meta: AttentionMetadata | DenseAttentionMetadata):
    _CONTEXT.append(meta)
    try:
        yield meta
    finally:
        _CONTEXT.pop()


def get_attention_metadata() -> AttentionMetadata | DenseAttentionMetadata | None:
    """The innermost context's metadata; None outside any (plain causal attention, no cache)."""
    return _CONTEXT[-1] if _CONTEXT else None


def checkpoint_in_context(fn, *args):
    """torch's activation checkpointing of `fn(*args)` for modules whose attention reads the context: the
    recomputation runs during backward, after the `with forward_context` block has exited, so it re-enters
    the metadata of the forward pass."""
    meta = get_attention_metadata()

    def run(*inputs):
        if meta is None:
            return fn(*inputs)
        with forward_context(meta):
            return fn(*inputs)

    return checkpoint(run, *args, use_reentrant=False)


def _group(rows: torch.Tensor, query_lens: torch.Tensor, context_lens: torch.Tensor, tables: torch.Tensor,
           q_starts: torch.Tensor, block_size: int) -> AttentionGroup:
    """One SDPA call over the requests `rows` (indices into the step's requests)."""
    q_len, ctx_len, start = query_lens[rows], context_lens[rows], q_starts[rows]
    num_reqs = rows.numel()
    max_q = int(q_len.max())
    max_blocks = int((ctx_len.max() + block_size - 1) // block_size)
    block_table = tables[rows, :max_blocks]
    q_rows = torch.arange(max_q)
    is_real = q_rows[None, :] < q_len[:, None]  # [B, max_q]
    q_index = torch.where(is_real, start[:, None] + q_rows[None, :], start[:, None])
    # one request's whole context (no cached prefix): causal over its own tokens, no mask needed
    fresh = (int(start[0]), max_q) if num_reqs == 1 and max_q > 1 and int(ctx_len[0]) == max_q else None
    mask = None
    # query row r sits at absolute position ctx_len - q_len + r and sees keys up to it
    limit = (ctx_len - q_len)[:, None] + q_rows[None, :]  # [B, max_q]
    if fresh is None and (max_q > 1 or bool((ctx_len != max_blocks * block_size).any())):
        key_pos = torch.arange(max_blocks * block_size)
        mask = key_pos[None, None, :] <= limit[:, :, None]
        mask[:, :, 0] |= ~is_real  # padding rows attend to something so SDPA stays finite
        mask = mask.unsqueeze(1)
    flat_rows = (torch.arange(num_reqs)[:, None] * max_q + q_rows[None, :])[is_real]
    return AttentionGroup(q_index=q_index, block_table=block_table, mask=mask, out_index=flat_rows,
                          token_index=q_index[is_real], context_lens=ctx_len, is_decode=max_q == 1,
                          fresh_range=fresh, query_positions=limit)


def build_attention_metadata(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    output_requests: list[int] | None = None,
) -> AttentionMetadata:
    """Metadata for one step.

    For request i, `query_lens[i]` tokens are scheduled (they are its last ones), `context_lens[i]` is its
    length once they are computed (cached prefix + these), and `block_tables[i]` holds enough blocks for it.
    Scheduled tokens are laid out flat in request order. Decodes (one query token) share one attention
    call; each longer chunk gets its own, so nothing is padded to the longest prompt.
    `output_requests` (ascending request indices): the step reads only the hidden state of these requests' last
    scheduled tokens (`AttentionMetadata.output_group`); None: every row.
    """
    num_reqs = len(query_lens)
    blocks_needed = [-(-c // block_size) for c in context_lens]
    for q_len, ctx_len, table, n in zip(query_lens, context_lens, block_tables, blocks_needed):
        if not 0 < q_len <= ctx_len or len(table) < n:
            raise ValueError(f"bad request geometry: query {q_len}, context {ctx_len}, blocks {len(table)}")
    if num_reqs and output_requests is None and all(q == 1 for q in query_lens):
        return _decode_metadata(context_lens, block_tables, blocks_needed, block_size)
    return _general_metadata(query_lens, context_lens, block_tables, blocks_needed, block_size, output_requests)


def _padded_tables(block_tables: list[list[int]], blocks_needed: list[int], max_blocks: int) -> torch.Tensor:
    """One padded block table for the step, [requests, max_blocks] (padding points at block 0, the null block)."""
    return torch.tensor([table[:n] + [0] * (max_blocks - n) for table, n in zip(block_tables, blocks_needed)],
                        dtype=torch.long)


def _general_metadata(query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
                      blocks_needed: list[int], block_size: int,
                      output_requests: list[int] | None = None) -> AttentionMetadata:
    """`build_attention_metadata` of any step (checked geometry; `blocks_needed[i]` = ceil(context / block_size))."""
    num_reqs = len(query_lens)
    max_blocks = max(blocks_needed, default=0)
    tables = _padded_tables(block_tables, blocks_needed, max_blocks).view(num_reqs, max_blocks)
    q_len = torch.tensor(query_lens, dtype=torch.long)
    ctx_len = torch.tensor(context_lens, dtype=torch.long)
    q_starts = torch.cumsum(q_len, 0) - q_len
    num_tokens = int(q_len.sum()) if num_reqs else 0
    # slot of every scheduled token: its request's block at position // block_size, offset position % block_size
    req_of_token = torch.repeat_interleave(torch.arange(num_reqs), q_len)
    pos = (ctx_len - q_len)[req_of_token] + torch.arange(num_tokens) - q_starts[req_of_token]
    slot_mapping = tables[req_of_token, pos // block_size] * block_size + pos % block_size
    is_decode = q_len == 1
    groups = []
    if bool(is_decode.any()):
        groups.append(_group(is_decode.nonzero().flatten(), q_len, ctx_len, tables, q_starts, block_size))
    for i in (~is_decode).nonzero().flatten().tolist():
        groups.append(_group(torch.tensor([i]), q_len, ctx_len, tables, q_starts, block_size))
    output_group = None
    if output_requests is not None:
        # each output row is its request's last token: one query that sees the whole context, as a decode does
        output_group = _group(torch.tensor(output_requests, dtype=torch.long), torch.ones_like(q_len), ctx_len,
                              tables, q_starts + q_len - 1, block_size)
    return AttentionMetadata(slot_mapping=slot_mapping, groups=groups, num_tokens=num_tokens, block_size=block_size,
                             output_group=output_group)


def _decode_metadata(context_lens: list[int], block_tables: list[list[int]], blocks_needed: list[int],
                     block_size: int) -> AttentionMetadata:
    """`build_attention_metadata` of a decode-only step (one query token per request): the same tensors, from
    a few ops instead of ~30. Every query is its request's last token, at position context - 1 and flat row i;
    single-stream decode builds one of these per token, between the `lm_head` of one step and the first linear
    of the next."""
    num_reqs, max_blocks = len(context_lens), max(blocks_needed)
    last = [c - 1 for c in context_lens]
    slots = [table[p // block_size] * block_size + p % block_size for table, p in zip(block_tables, last)]
    tables = _padded_tables(block_tables, blocks_needed, max_blocks)
    rows = torch.arange(num_reqs)
    limit = torch.tensor(last, dtype=torch.long).view(num_reqs, 1)  # [B, 1]: the last key each query sees
    mask = None
    if any(c != max_blocks * block_size for c in context_lens):
        mask = (torch.arange(max_blocks * block_size) <= limit[:, :, None]).unsqueeze(1)  # [B, 1, 1, K]
    group = AttentionGroup(q_index=rows.view(num_reqs, 1), block_table=tables, mask=mask, out_index=rows,
                           token_index=rows, context_lens=torch.tensor(context_lens, dtype=torch.long),
                           is_decode=True, fresh_range=None, query_positions=limit)
    return AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long), groups=[group], num_tokens=num_reqs,
                             block_size=block_size)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """Rows k, v [N, kv_heads * head_dim] into their slots of the caches [slots, kv_heads, head_dim]: one kernel
    call where it runs (a decode step writes one row per layer: two `index_copy_` cost more than the copy)."""
    if k.dtype == k_cache.dtype and v.dtype == v_cache.dtype and kernels.can_fuse(k_cache, v_cache) \
            and k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous():
        kernels.write_kv_(k_cache, v_cache, slot_mapping, k.view(k.shape[0], -1), v.view(v.shape[0], -1))
        return
    shape = (k.shape[0], *k_cache.shape[1:])
    k_cache.index_copy_(0, slot_mapping, k.reshape(shape).to(k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping, v.reshape(shape).to(v_cache.dtype))


class Attention(nn.Module):
    """Causal self-attention, against the paged KV cache or over the given sequences.

    Paged (an `AttentionMetadata` in the context): forward(q [N, num_heads*head_dim], k, v [N,
    num_kv_heads*head_dim]) -> [N, num_heads*head_dim] over the step's flat batch; the runner binds
    `self.kv_cache = (k_cache, v_cache)` after allocating the pool.
    Non-paged (a `DenseAttentionMetadata`, or no context): q, k, v [B, L, width] (or [L, width], one
    sequence) -> [B, L, num_heads*head_dim]; nothing is cached.
    Paged decode groups run fovea's C++ kernel (`fovea.kernels.paged_decode`) when `use_kernel` and the
    kernels run here, else gather + SDPA. Prefill groups (whole prompts, and chunks after cached context) run
    fovea's causal AVX-512 BF16 kernel in bfloat16 without a bias (`fovea.layers.prefill_attention`), else SDPA.

    `attn_bias` (T5's relative position bias): additive float scores that already hold the causal mask
    (-inf where a key may not be seen); paged, one [B, num_heads, max_q, max_blocks * block_size] tensor per
    group of the step's metadata; dense, one [B or 1, num_heads, L, L] tensor. Decode groups hand it to the
    paged decode kernel (which adds it to the scores); longer query runs gather and run SDPA with it as the mask.
    """

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int | None = None,
                 use_kernel: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.use_kernel = use_kernel

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_bias: list[torch.Tensor] | torch.Tensor | None = None) -> torch.Tensor:
        meta = get_attention_metadata()
        if not isinstance(meta, AttentionMetadata):
            if meta is None and self.kv_cache is not None:  # a serving model run outside its step's context
                raise RuntimeError("a layer with a bound KV cache runs inside fovea.layers.attention.forward_context")
            if attn_bias is not None:
                if meta is not None and meta.mask is not None:
                    raise ValueError("a padded dense batch with a position bias: fold the padding into the bias")
                return self._forward_dense(q, k, v, attn_bias)
            return self._forward_dense(q, k, v, None if meta is None else meta.mask)
        if self.kv_cache is None:
            raise RuntimeError("KV cache not bound to this attention layer")
        k_cache, v_cache = self.kv_cache
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        write_kv(k_cache, v_cache, meta.slot_mapping, k, v)
        if attn_bias is not None and len(attn_bias) != len(meta.groups):
            raise ValueError(f"attn_bias has {len(attn_bias)} tensors for the step's {len(meta.groups)} groups")
        bs = meta.block_size
        groups = meta.groups
        if len(groups) == 1 and groups[0].is_decode and self.use_kernel and kernels.is_available():
            # a decode-only step (single-stream decode): its rows are already in token order, one kernel call
            g = groups[0]
            return kernels.paged_decode(q, k_cache, v_cache, g.block_table, g.context_lens, self.scale, bs,
                                        None if attn_bias is None else attn_bias[0][:, :, 0]
                                        ).view(num_tokens, -1).to(q.dtype)
        out = q.new_empty(num_tokens, self.num_heads * self.head_dim)
        k_blocks = k_cache.view(-1, bs, self.num_kv_heads, self.head_dim)
        v_blocks = v_cache.view(-1, bs, self.num_kv_heads, self.head_dim)
        prefill_on_kernel = attn_bias is None and self.use_kernel and prefill_attention.runs_here(
            q, k, v, k_cache, self.scale)
        if prefill_on_kernel:
            whole_step = self._prefill_on_kernel(q, k, v, groups, k_blocks, v_blocks, out)
            if whole_step is not None:
                return whole_step
        for i, g in enumerate(groups):
            if prefill_on_kernel and not g.is_decode:
                continue
            num_reqs = g.block_table.shape[0]
            bias = None if attn_bias is None else attn_bias[i]  # (B, nh, max_q, K): the causal mask is in it
            if g.is_decode and self.use_kernel and kernels.is_available():
                is_whole_step = num_reqs == num_tokens  # a decode-only step: rows already in token order
                og = kernels.paged_decode(q if is_whole_step else q[g.token_index], k_cache, v_cache,
                                          g.block_table, g.context_lens, self.scale, bs,
                                          None if bias is None else bias[:, :, 0])  # (B, nh, hs)
                if is_whole_step:
                    return og.view(num_tokens, -1).to(out.dtype)
                out[g.token_index] = og.reshape(num_reqs, -1).to(out.dtype)
                continue
            if bias is not None:
                out[g.token_index] = self._attend_blocks(q, g, k_blocks, v_blocks, bias.to(q.dtype))
                continue
            if g.fresh_range is not None:
                lo, n = g.fresh_range
                kv_shape = (n, self.num_kv_heads, self.head_dim)
                # 4-D: torch's CPU flash kernel takes only batched inputs (3-D ones run ~10x slower)
                og = F.scaled_dot_product_attention(
                    q[lo:lo + n].transpose(0, 1)[None], k[lo:lo + n].view(kv_shape).transpose(0, 1)[None],
                    v[lo:lo + n].view(kv_shape).transpose(0, 1)[None], is_causal=True, scale=self.scale,
                    enable_gqa=self.num_kv_heads != self.num_heads,
                )  # (1, nh, n, hs)
                out[lo:lo + n] = og[0].transpose(0, 1).reshape(n, -1)
                continue
            out[g.token_index] = self._attend_blocks(q, g, k_blocks, v_blocks, g.mask)
        return out

    def _prefill_on_kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: list[AttentionGroup],
                           k_blocks: torch.Tensor, v_blocks: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        """Every prefill group of the step on fovea's causal kernel, written into `out` [N, nh * hs]; the kernel's
        output itself when one run of whole prompts is the whole step (nothing to copy)."""
        fresh = [g.fresh_range for g in groups if g.fresh_range is not None]
        for lo, lengths in prefill_attention.fresh_runs(fresh):
            rows = prefill_attention.attend_fresh(q, k, v, lo, lengths, self.num_kv_heads, self.scale)
            if rows.shape[0] == out.shape[0]:
                return rows
            out[lo:lo + rows.shape[0]] = rows
        chunks = [(int(g.token_index[0]), g.token_index.numel(), int(g.context_lens[0]), g.block_table[0])
                  for g in groups if not g.is_decode and g.fresh_range is None]
        if chunks:
            rows = prefill_attention.attend_chunks(q, chunks, k_blocks, v_blocks, self.scale)
            first = 0
            for lo, n, _, _ in chunks:
                out[lo:lo + n] = rows[first:first + n]
                first += n
        return None

    def forward_rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The step's K/V of every row into the cache, and attention for the metadata's output rows only:
        q, k, v as `forward` -> [len(output rows), num_heads * head_dim], in the group's order. An output row is
        its request's last token, so its attention is a decode's over the request's whole context, this step's
        keys included (written first)."""
        meta = get_attention_metadata()
        g = meta.output_group
        k_cache, v_cache = self.kv_cache
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        write_kv(k_cache, v_cache, meta.slot_mapping, k, v)
        if self.use_kernel and kernels.is_available():
            out = kernels.paged_decode(q[g.token_index], k_cache, v_cache, g.block_table, g.context_lens, self.scale,
                                       meta.block_size)  # (S, nh, hs)
            return out.view(out.shape[0], -1).to(q.dtype)
        bs = meta.block_size
        k_blocks = k_cache.view(-1, bs, self.num_kv_heads, self.head_dim)
        v_blocks = v_cache.view(-1, bs, self.num_kv_heads, self.head_dim)
        return self._attend_blocks(q, g, k_blocks, v_blocks, g.mask)

    def _attend_blocks(self, q: torch.Tensor, g: AttentionGroup, k_blocks: torch.Tensor, v_blocks: torch.Tensor,
                       mask: torch.Tensor | None) -> torch.Tensor:
        """The group's real query rows [n, num_heads * head_dim], attending over its gathered blocks."""
        num_reqs = g.block_table.shape[0]
        qg = q[g.q_index].transpose(1, 2)  # (B, nh, max_q, hs)
        # whole blocks at a time: one contiguous copy per block instead of one per token
        kg = k_blocks[g.block_table].view(num_reqs, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        vg = v_blocks[g.block_table].view(num_reqs, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        og = F.scaled_dot_product_attention(
            qg, kg, vg, attn_mask=mask, scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads
        )  # (B, nh, max_q, hs)
        return og.transpose(1, 2).reshape(-1, self.num_heads * self.head_dim)[g.out_index]

    def _forward_dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mask: torch.Tensor | None) -> torch.Tensor:
        batch, length = (1, q.shape[0]) if q.dim() == 2 else q.shape[:2]
        q4 = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, L, hs)
        k4 = k.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, L, hs)
        v4 = v.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if mask is not None and mask.is_floating_point():
            mask = mask.to(q4.dtype)
        out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                             enable_gqa=self.num_kv_heads != self.num_heads)  # (B, nh, L, hs)
        return out.transpose(1, 2).reshape(*q.shape[:-1], self.num_heads * self.head_dim)

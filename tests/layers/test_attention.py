"""Paged attention against dense causal attention computed in float64, for both the C++ decode kernel and
the gather + SDPA path, across GQA, scattered block tables, chunked prefill and mixed batches."""
from __future__ import annotations

import pytest
import torch

from fovea import kernels
from fovea.layers.attention import Attention, build_attention_metadata, forward_context
from tests.kernels import requires_compiler
from tests.layers import causal_attention_float64

H, KV, D, BS = 6, 2, 16, 4


@pytest.mark.parametrize("use_kernel", [pytest.param(True, marks=requires_compiler), False])
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_chunked_prefill_then_decode_equals_dense(use_kernel, dtype, atol):
    assert kernels.is_available() or not use_kernel  # the suite runs in "require" mode: no silent fallback
    gen = torch.Generator().manual_seed(0)
    lengths = [9, 14, 5]
    seqs = [tuple(torch.randn(n, h, D, generator=gen) for h in (H, KV, KV)) for n in lengths]
    attn = Attention(H, D, D**-0.5, KV, use_kernel=use_kernel)
    num_blocks = 40
    # stale garbage in the pool: only written slots may influence the result
    attn.kv_cache = tuple(torch.randn(num_blocks * BS, KV, D, generator=gen).to(dtype) * 100 for _ in range(2))
    attn.kv_cache[0][:BS] = 0
    attn.kv_cache[1][:BS] = 0
    order = (1 + torch.randperm(num_blocks - 1, generator=gen)).tolist()
    tables = [order[0:5], order[5:10], order[10:15]]
    done = [0, 0, 0]
    # prefill in chunks mixed with decodes (a 0 skips the request that step), then decode one token at a time
    plan = [(3, 4, 2), (2, 6, 1), (0, 3, 1)] + [(1, 1, 1)] * max(lengths)
    outputs = [[] for _ in lengths]
    for step in plan:
        active = [(i, n) for i, n in enumerate(step) if n and done[i] < lengths[i]]
        active = [(i, min(n, lengths[i] - done[i])) for i, n in active]
        if not active:
            continue
        meta = build_attention_metadata([n for _, n in active], [done[i] + n for i, n in active],
                                        [tables[i] for i, _ in active], BS)
        q = torch.cat([seqs[i][0][done[i]:done[i] + n] for i, n in active]).flatten(1).to(dtype)
        k = torch.cat([seqs[i][1][done[i]:done[i] + n] for i, n in active]).flatten(1).to(dtype)
        v = torch.cat([seqs[i][2][done[i]:done[i] + n] for i, n in active]).flatten(1).to(dtype)
        with forward_context(meta):
            out = attn(q, k, v)
        start = 0
        for i, n in active:
            outputs[i].append(out[start:start + n])
            start += n
            done[i] += n
    for i, n in enumerate(lengths):
        got = torch.cat(outputs[i]).view(n, H, D).double()
        want = causal_attention_float64(*(t.to(dtype) for t in seqs[i]))
        assert (got - want).abs().max().item() < atol


@requires_compiler
def test_kernel_and_sdpa_paths_agree_on_a_large_decode_batch():
    assert kernels.is_available()
    gen = torch.Generator().manual_seed(1)
    num_blocks, bs, batch = 300, 16, 24
    kv = [torch.randn(num_blocks * bs, KV, D, generator=gen) for _ in range(2)]
    context = torch.randint(1, 120, (batch,), generator=gen).tolist()
    order = (1 + torch.randperm(num_blocks - 1, generator=gen)).tolist()
    tables, used = [], 0
    for c in context:
        n = -(-c // bs)
        tables.append(order[used:used + n])
        used += n
    meta = build_attention_metadata([1] * batch, context, tables, bs)
    q, k, v = (torch.randn(batch, h * D, generator=gen) for h in (H, KV, KV))
    results = []
    for use_kernel in (True, False):
        attn = Attention(H, D, D**-0.5, KV, use_kernel=use_kernel)
        attn.kv_cache = tuple(t.clone() for t in kv)
        with forward_context(meta):
            results.append(attn(q, k, v))
    assert (results[0] - results[1]).abs().max().item() < 1e-5


def _assert_same_metadata(fast, general):
    assert (fast.num_tokens, fast.block_size, fast.cross, fast.output_group) == \
        (general.num_tokens, general.block_size, general.cross, general.output_group)
    assert torch.equal(fast.slot_mapping, general.slot_mapping) and fast.slot_mapping.dtype == torch.long
    assert len(fast.groups) == len(general.groups) == 1
    a, b = fast.groups[0], general.groups[0]
    for name in ("q_index", "block_table", "out_index", "token_index", "context_lens", "query_positions"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), name
    assert (a.mask is None) == (b.mask is None)
    if a.mask is not None:
        assert a.mask.shape == b.mask.shape and torch.equal(a.mask, b.mask)
    assert (a.is_decode, a.fresh_range) == (b.is_decode, b.fresh_range) == (True, None)


@pytest.mark.parametrize("seed", range(6))
def test_decode_only_metadata_is_the_general_one(seed):
    # a decode-only step takes a short path (fovea.layers.attention._decode_metadata): every tensor the general
    # builder makes for it, bit for bit, with contexts that end on a block boundary (no mask) or inside one
    from fovea.layers import attention

    gen = torch.Generator().manual_seed(seed)
    bs = [1, 4, 16][seed % 3]
    batch = [1, 1, 3, 7, 2, 24][seed]
    context = torch.randint(1, 70, (batch,), generator=gen).tolist()
    if seed == 1:
        context = [2 * bs]  # every context a whole number of blocks: no mask
    tables = [(1 + torch.randperm(200, generator=gen)[:-(-c // bs) + seed % 2]).tolist() for c in context]
    fast = build_attention_metadata([1] * batch, context, tables, bs)
    needed = [-(-c // bs) for c in context]
    _assert_same_metadata(fast, attention._general_metadata([1] * batch, context, tables, needed, bs))
    with pytest.raises(ValueError, match="bad request geometry"):
        build_attention_metadata([1] * batch, context, [t[:n - 1] for t, n in zip(tables, needed)], bs)

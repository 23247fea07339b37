"""Paged attention against dense causal attention computed in float64, for both the C++ decode kernel and
the gather + SDPA path, across GQA, scattered block tables, chunked prefill and mixed batches."""
from __future__ import annotations

import pytest
import torch

from fovea.layers import paged_attention_cpu
from fovea.layers.attention import Attention, build_attention_metadata, forward_context

H, KV, D, BS = 6, 2, 16, 4


def _reference(q, k, v):
    """Dense causal attention of one sequence, float64. q [T, H, D], k/v [T, KV, D]."""
    k = k.double().repeat_interleave(H // KV, dim=1)
    v = v.double().repeat_interleave(H // KV, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * D**-0.5
    scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_chunked_prefill_then_decode_equals_dense(use_kernel, dtype, atol):
    if use_kernel and paged_attention_cpu.load() is None:
        pytest.skip("C++ kernel could not be built here")
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
        want = _reference(*(t.to(dtype) for t in seqs[i]))
        assert (got - want).abs().max().item() < atol


def test_kernel_and_sdpa_paths_agree_on_a_large_decode_batch():
    if paged_attention_cpu.load() is None:
        pytest.skip("C++ kernel could not be built here")
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


@pytest.mark.parametrize("head_dim", [16, 64, 128])  # 64 and 128 run the kernel's fixed-size specialisations
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_kernel_equals_float64_softmax_for_each_head_size(head_dim, dtype, atol):
    kernel = paged_attention_cpu.load()
    if kernel is None:
        pytest.skip("C++ kernel could not be built here")
    gen = torch.Generator().manual_seed(head_dim)
    heads, kv_heads, bs, batch = 8, 2, 16, 5
    context = [1, 17, 40, 97, 300]
    num_blocks = 1 + sum(-(-c // bs) for c in context)
    order = (1 + torch.randperm(num_blocks - 1, generator=gen)).tolist()
    tables, used = [], 0
    for c in context:
        tables.append(order[used:used + -(-c // bs)])
        used += len(tables[-1])
    max_blocks = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables])
    # large scores, so a poor exp or a missing max subtraction would show
    k_cache, v_cache = (torch.randn(num_blocks * bs, kv_heads, head_dim, generator=gen).mul(4).to(dtype)
                        for _ in range(2))
    q = torch.randn(batch, heads, head_dim, generator=gen).mul(4).to(dtype)
    got = kernel.paged_decode(q, k_cache, v_cache, table, torch.tensor(context), head_dim**-0.5, bs)
    for b, c in enumerate(context):
        slots = torch.tensor([tables[b][t // bs] * bs + t % bs for t in range(c)])
        k = k_cache[slots].double().repeat_interleave(heads // kv_heads, dim=1)
        v = v_cache[slots].double().repeat_interleave(heads // kv_heads, dim=1)
        probs = (torch.einsum("hd,thd->ht", q[b].double(), k) * head_dim**-0.5).softmax(-1)
        want = torch.einsum("ht,thd->hd", probs, v)
        assert (got[b].double() - want).abs().max().item() < atol * 4

"""The paged decode attention kernel against a float64 softmax over the same scattered blocks, for each head size
(the Attention layer's tests, tests/layers/test_attention.py, run it inside chunked-prefill and mixed batches)."""
from __future__ import annotations

import pytest
import torch

from fovea import kernels
from tests.kernels import requires_compiler

pytestmark = requires_compiler


@pytest.mark.parametrize("head_dim", [16, 64, 128])  # 64 and 128 run the kernel's fixed-size specialisations
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("with_bias", [False, True])  # T5's relative position scores, added to the scaled ones
@pytest.mark.parametrize("kv_heads", [2, 8])  # 8: no GQA (bfloat16 heads of 64 run the AVX-512 BF16 path)
def test_decode_kernel_equals_float64_softmax_for_each_head_size(head_dim, dtype, atol, with_bias, kv_heads):
    gen = torch.Generator().manual_seed(head_dim)
    heads, bs, batch = 8, 16, 5
    context = [1, 17, 40, 97, 300]
    # large scores (x4), so a poor exp or a missing max subtraction would show
    q, k_cache, v_cache, table = scattered_cache(context, bs, heads, head_dim, gen, kv_heads=kv_heads, dtype=dtype)
    tables, max_blocks = table.tolist(), table.shape[1]
    # wider than the longest context (as a step's bias is: whole blocks); the tail must not be read
    bias = torch.randn(batch, heads, max_blocks * bs + 3, generator=gen).mul(3) if with_bias else None
    got = kernels.paged_decode(q, k_cache, v_cache, table, torch.tensor(context), head_dim**-0.5, bs, bias)
    for b, c in enumerate(context):
        slots = torch.tensor([tables[b][t // bs] * bs + t % bs for t in range(c)])
        k = k_cache[slots].double().repeat_interleave(heads // kv_heads, dim=1)
        v = v_cache[slots].double().repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("hd,thd->ht", q[b].double(), k) * head_dim**-0.5
        probs = (scores + (bias[b, :, :c].double() if with_bias else 0.0)).softmax(-1)
        want = torch.einsum("ht,thd->hd", probs, v)
        assert (got[b].double() - want).abs().max().item() < atol * 4


def test_decode_kernel_refuses_a_bias_of_the_wrong_shape():
    q, cache = torch.randn(2, 4, 16), torch.randn(8, 4, 16)
    table, lens = torch.tensor([[1], [2]]), torch.tensor([3, 4])
    with pytest.raises(RuntimeError, match="bias must be"):
        kernels.paged_decode(q, cache, cache, table, lens, 1.0, 4, torch.zeros(2, 3, 4))
    with pytest.raises(RuntimeError, match="shorter than the longest context"):
        kernels.paged_decode(q, cache, cache, table, lens, 1.0, 4, torch.zeros(2, 4, 3))


def scattered_cache(context: list[int], bs: int, heads: int, head_dim: int, gen: torch.Generator, *,
                    kv_heads: int | None = None, dtype: torch.dtype = torch.bfloat16):
    """q [B, heads, head_dim] and caches [slots, kv_heads (default: heads), head_dim] over blocks in shuffled order,
    values x4; the block table [B, max_blocks] (unused entries 0)."""
    kv_heads = kv_heads or heads
    num_blocks = 1 + sum(-(-c // bs) for c in context)
    order = (1 + torch.randperm(num_blocks - 1, generator=gen)).tolist()
    tables, used = [], 0
    for c in context:
        tables.append(order[used:used + -(-c // bs)])
        used += len(tables[-1])
    max_blocks = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables])
    k_cache, v_cache = (torch.randn(num_blocks * bs, kv_heads, head_dim, generator=gen).mul(4).to(dtype)
                        for _ in range(2))
    q = torch.randn(len(context), heads, head_dim, generator=gen).mul(4).to(dtype)
    return q, k_cache, v_cache, table


@pytest.mark.parametrize("bs", [16, 5, 37])  # keys go 16 at a time: blocks shorter and longer than that
@pytest.mark.parametrize("scale, with_bias", [(1.0, True), (0.125, False)])  # T5 (bias, unscaled); OPT's 64**-0.5
@pytest.mark.parametrize("num_threads", [1, 2])
def test_bfloat16_heads_of_64_equal_the_float32_arithmetic(bs, scale, with_bias, num_threads):
    """bfloat16 heads of 64 without GQA run their own loop (AVX-512 BF16 score products where the CPU has them):
    the same float32 arithmetic as the float32 kernel on the same values, summed in another order: at most one
    bfloat16 step in an output (plus float32 rounding where a weighted sum of values cancels), on ~all none."""
    gen = torch.Generator().manual_seed(bs)
    context = [1, 15, 16, 17, 33, 55, 64, 130]
    q, k_cache, v_cache, table = scattered_cache(context, bs, 12, 64, gen)
    bias = torch.randn(len(context), 12, table.shape[1] * bs, generator=gen).mul(3) if with_bias else None
    lens = torch.tensor(context)
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        got = kernels.paged_decode(q, k_cache, v_cache, table, lens, scale, bs, bias)
        want = kernels.paged_decode(q.float(), k_cache.float(), v_cache.float(), table, lens, scale, bs, bias)
    finally:
        torch.set_num_threads(previous)
    assert got.dtype == torch.bfloat16
    rounded = want.bfloat16().float()
    # one bfloat16 step (8 significant bits) of the larger of the two, and float32's rounding of a sum of values
    step = torch.maximum(got.float().abs(), rounded.abs()) * 2.0**-7
    cancel = 1e-5 * v_cache.float().abs().max()
    diff = (got.float() - rounded).abs()
    assert (diff <= step + cancel).all(), (diff - step).max()
    assert (diff == 0).float().mean() > 0.99

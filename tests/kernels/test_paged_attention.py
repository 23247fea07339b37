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
def test_decode_kernel_equals_float64_softmax_for_each_head_size(head_dim, dtype, atol, with_bias):
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

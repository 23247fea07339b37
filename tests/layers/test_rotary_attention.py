"""RotaryQKVAttention: a packed qkv with rotary q/k, attended as `Attention` attends the rotated q, k, v; a
decode-only step runs one kernel call (`kernels.rotary_paged_decode`) that must give the separate path's bits."""
from __future__ import annotations

import pytest
import torch

from fovea import kernels
from fovea.layers.attention import Attention, build_attention_metadata, forward_context
from fovea.layers.rotary import apply_rotary_packed
from fovea.layers.rotary_attention import RotaryQKVAttention
from tests.kernels import requires_compiler

H, KV, D, BS = 6, 2, 16, 4
WIDTH = (H + 2 * KV) * D


def _rotary(rows: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.randn(rows, D // 2, generator=gen) * 30
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _pair(dtype: torch.dtype, num_blocks: int, gen: torch.Generator, use_kernel: bool = True):
    """A RotaryQKVAttention and a plain Attention over two copies of one cache with stale garbage in it."""
    cache = [torch.randn(num_blocks * BS, KV, D, generator=gen).to(dtype) * 50 for _ in range(2)]
    fused = RotaryQKVAttention(H, D, D**-0.5, KV, use_kernel=use_kernel)
    plain = Attention(H, D, D**-0.5, KV, use_kernel=use_kernel)
    fused.kv_cache = tuple(c.clone() for c in cache)
    plain.kv_cache = tuple(c.clone() for c in cache)
    return fused, plain


def _plain_step(attn: Attention, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    q, k, v = apply_rotary_packed(qkv.clone(), cos, sin, H + KV).split([H * D, KV * D, KV * D], dim=-1)
    return attn(q, k, v)


@requires_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_in_one_kernel_call_equal_the_separate_path_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(1)
    num_blocks = 30
    fused, plain = _pair(dtype, num_blocks, gen)
    tables = [[3, 7, 11, 2], [5, 9, 20, 21], [13, 1, 4, 6]]
    prompt = [5, 9, 2]  # prefill first (the separate path), then decode steps (the one call)
    calls = []
    original = kernels.rotary_paged_decode
    kernels.rotary_paged_decode = lambda *args: calls.append(1) or original(*args)
    try:
        for step in range(6):
            query = prompt if step == 0 else [1, 1, 1]
            context = [p + max(0, step) for p in prompt] if step else prompt
            meta = build_attention_metadata(query, context, tables, BS)
            qkv = (torch.randn(sum(query), WIDTH, generator=gen) * 3).to(dtype)
            cos, sin = _rotary(sum(query), dtype, gen)
            with forward_context(meta):
                got = fused(qkv.clone(), cos, sin)
                want = _plain_step(plain, qkv, cos, sin)
            assert torch.equal(got, want), step
            assert torch.equal(fused.kv_cache[0], plain.kv_cache[0]) and torch.equal(fused.kv_cache[1], plain.kv_cache[1])
    finally:
        kernels.rotary_paged_decode = original
    assert len(calls) == 5  # every decode-only step took the one call, the prefill step did not


@pytest.mark.parametrize("use_kernel", [pytest.param(True, marks=requires_compiler), False])
def test_mixed_steps_and_no_context_take_the_separate_path(use_kernel):
    gen = torch.Generator().manual_seed(2)
    fused, plain = _pair(torch.float32, 20, gen, use_kernel)
    # a decode mixed with a prefill chunk: two groups, so not a decode-only step
    meta = build_attention_metadata([1, 3], [5, 3], [[1, 2], [3]], BS)
    qkv = torch.randn(4, WIDTH, generator=gen)
    cos, sin = _rotary(4, torch.float32, gen)
    with forward_context(meta):
        torch.testing.assert_close(fused(qkv.clone(), cos, sin), _plain_step(plain, qkv, cos, sin), rtol=0, atol=0)
    # no context: plain causal attention over the tokens given, nothing cached (training, export)
    fused.kv_cache = plain.kv_cache = None
    torch.testing.assert_close(fused(qkv.clone(), cos, sin), _plain_step(plain, qkv, cos, sin), rtol=0, atol=0)


@requires_compiler
def test_rotary_paged_decode_names_bad_arguments():
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache = torch.zeros(16, KV, D), torch.zeros(16, KV, D)
    qkv = torch.randn(2, WIDTH, generator=gen)
    cos, sin = _rotary(2, torch.float32, gen)
    table, context = torch.tensor([[1], [2]]), torch.tensor([1, 1])

    def call(qkv=qkv, slots=torch.tensor([4, 8]), heads=H, table=table):
        return kernels.rotary_paged_decode(qkv, cos, sin, k_cache, v_cache, slots, table, context, heads, 0.25, BS)

    with pytest.raises(RuntimeError, match=r"qkv has 159 columns; \(num_heads \+ 2 kv_heads\) \* head_dim = 160"):
        call(qkv=qkv[:, :-1])
    with pytest.raises(RuntimeError, match="positive multiple of kv_heads"):
        call(heads=5)
    with pytest.raises(RuntimeError, match="one request per row"):
        call(table=table[:1])
    with pytest.raises(RuntimeError, match=r"slot_mapping\[1\] = 16 is outside the cache's 16 slots"):
        call(slots=torch.tensor([4, 16]))
    with pytest.raises(RuntimeError, match="one dtype"):
        call(qkv=qkv.bfloat16())

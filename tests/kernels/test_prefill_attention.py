"""fovea's AVX-512 BF16 attention kernel with `causal=True` and grouped-query heads (a decoder's prefill) against
softmax attention in float64 and against torch's SDPA in bfloat16 (the path it replaces): as close to float64 as
SDPA is, the mask aligned bottom-right, segments independent of each other and of the threads."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fovea.kernels import encoder_attention as attention_kernel
from tests.kernels import BF16_STEP, requires_compiler, segment_offsets

pytestmark = [
    requires_compiler,
    pytest.mark.skipif(not attention_kernel.available(), reason="no AVX-512 BF16 on this CPU"),
]

def _visible(n_q, n_k):
    """[n_q, n_k] bool: query row i (position i + n_k - n_q) sees keys j <= i + n_k - n_q."""
    return torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None] + (n_k - n_q)


def _float64(q, k, v, scale):  # q [n_q, H, D], k, v [n_k, Hkv, D]
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    scores = scores.masked_fill(~_visible(q.shape[0], k.shape[0]), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def _sdpa(q, k, v, scale):
    """torch's bfloat16 SDPA as fovea's attention layer called it: is_causal for a whole prompt, a bool mask for a
    chunk after cached context."""
    n_q, n_k = q.shape[0], k.shape[0]
    mask = None if n_q == n_k else _visible(n_q, n_k)
    out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=mask,
                                         is_causal=mask is None, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


def _segments(q_lengths, k_lengths, heads, kv_heads, head_dim, seed):
    gen = torch.Generator().manual_seed(seed)
    # q, k, v as views of one packed qkv projection row, as the decoder's layers hand them over
    width = (heads + 2 * kv_heads) * head_dim
    qkv = (torch.randn(sum(q_lengths), width, generator=gen) * 2).bfloat16()
    q = qkv[:, :heads * head_dim].view(-1, heads, head_dim)
    if k_lengths == q_lengths:
        k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(-1, kv_heads, head_dim)
        v = qkv[:, (heads + kv_heads) * head_dim:].view(-1, kv_heads, head_dim)
    else:  # a chunk after cached context: keys gathered from the cache
        k, v = ((torch.randn(sum(k_lengths), kv_heads, head_dim, generator=gen) * 2).bfloat16() for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("head_dim, heads, kv_heads, q_lengths, k_lengths", [
    (64, 14, 2, [64, 1, 13, 257, 31], None),  # Qwen2-0.5B's LM: ratio 7, odd prompt lengths
    (128, 4, 4, [33, 2, 300], None),  # Llama / LLaVA's head size, no grouping
    (64, 4, 2, [5, 40, 1, 12], [300, 40, 7, 13]),  # chunks after cached context, ratio 2
    (128, 2, 1, [257, 0, 24], [600, 3, 24]),  # a chunk crossing three key blocks, an empty segment
    (18, 3, 1, [31], [33]),  # a head size not a multiple of 16
])
def test_causal_kernel_is_as_close_to_float64_as_sdpa(head_dim, heads, kv_heads, q_lengths, k_lengths):
    k_lengths = k_lengths or q_lengths
    scale = head_dim**-0.5
    q, k, v = _segments(q_lengths, k_lengths, heads, kv_heads, head_dim, head_dim + heads + len(q_lengths))
    cu_q, cu_k = segment_offsets(q_lengths), segment_offsets(k_lengths)
    got = attention_kernel.attention(q, k, v, cu_q, cu_k, scale, causal=True)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape and got.is_contiguous()
    for i in range(len(q_lengths)):
        if q_lengths[i] == 0:
            continue
        rows, keys = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        exact = _float64(q[rows], k[keys], v[keys], scale)
        sdpa = _sdpa(q[rows], k[keys], v[keys], scale)
        err, sdpa_err = (got[rows].double() - exact).abs(), (sdpa.double() - exact).abs()
        # a one-row segment's output is v's row itself in every implementation: errors of zero on both sides
        assert err.mean() <= 1.1 * sdpa_err.mean() + 1e-12, f"segment {i}"
        assert err.max() <= sdpa_err.max() + BF16_STEP * exact.abs().max(), f"segment {i}"
        assert (got[rows].double() - sdpa.double()).abs().max() <= 4 * BF16_STEP * exact.abs().max(), f"segment {i}"


def test_causal_mask_is_bottom_right_and_skipped_keys_are_never_read():
    """Row i of an n_q-row chunk over n_k keys sees exactly keys 0 .. i + n_k - n_q: a key past it, however large,
    changes nothing; the first key it does see changes its row."""
    gen = torch.Generator().manual_seed(5)
    n_q, n_k, heads, kv_heads, head_dim = 40, 300, 4, 2, 64
    q = torch.randn(n_q, heads, head_dim, generator=gen).bfloat16()
    k, v = (torch.randn(n_k, kv_heads, head_dim, generator=gen).bfloat16() for _ in range(2))
    cu_q, cu_k = segment_offsets([n_q]), segment_offsets([n_k])
    base = attention_kernel.attention(q, k, v, cu_q, cu_k, 0.125, causal=True)
    row = 17
    last_seen = row + n_k - n_q
    k2, v2 = k.clone(), v.clone()
    k2[last_seen + 1:] = 1e4
    v2[last_seen + 1:] = 1e4
    hidden = attention_kernel.attention(q, k2, v2, cu_q, cu_k, 0.125, causal=True)
    assert torch.equal(hidden[:row + 1], base[:row + 1])
    assert not torch.equal(hidden[row + 1:], base[row + 1:])
    v3 = v.clone()
    v3[last_seen] = 1e2
    seen = attention_kernel.attention(q, k, v3, cu_q, cu_k, 0.125, causal=True)
    assert torch.equal(seen[:row], base[:row]) and not torch.equal(seen[row], base[row])
    # a whole prompt (n_q == n_k) is torch's is_causal; a non-causal call over the same keys is not
    whole = attention_kernel.attention(q, k[:n_q], v[:n_q], cu_q, cu_q, 0.125, causal=True)
    assert torch.equal(whole[0], v[0].repeat_interleave(2, 0))  # row 0 sees key 0 only
    assert not torch.equal(whole, attention_kernel.attention(q, k[:n_q].repeat_interleave(2, 1),
                                                             v[:n_q].repeat_interleave(2, 1), cu_q, cu_q, 0.125))


def test_grouped_heads_equal_repeated_kv_heads_bit_for_bit():
    gen = torch.Generator().manual_seed(6)
    heads, kv_heads, head_dim = 14, 2, 64
    q = torch.randn(90, heads, head_dim, generator=gen).bfloat16()
    k, v = (torch.randn(90, kv_heads, head_dim, generator=gen).bfloat16() for _ in range(2))
    cu = segment_offsets([50, 40])
    grouped = attention_kernel.attention(q, k, v, cu, None, 0.125, causal=True)
    repeated = attention_kernel.attention(q, k.repeat_interleave(7, 1), v.repeat_interleave(7, 1), cu, None, 0.125,
                                          causal=True)
    assert torch.equal(grouped, repeated)


def test_segments_do_not_see_each_other_and_threads_do_not_matter():
    gen = torch.Generator().manual_seed(7)
    q_lengths, k_lengths = [257, 100, 13, 64], [257, 230, 13, 64]
    q = torch.randn(sum(q_lengths), 14, 64, generator=gen).bfloat16()
    k, v = (torch.randn(sum(k_lengths), 2, 64, generator=gen).bfloat16() for _ in range(2))
    cu_q, cu_k = segment_offsets(q_lengths), segment_offsets(k_lengths)
    together = attention_kernel.attention(q, k, v, cu_q, cu_k, 0.125, causal=True)
    alone = attention_kernel.attention(q[257:357], k[257:487], v[257:487], segment_offsets([100]),
                                       segment_offsets([230]), 0.125, causal=True)
    assert torch.equal(together[257:357], alone)  # a segment's bits do not depend on its batch
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = attention_kernel.attention(q, k, v, cu_q, cu_k, 0.125, causal=True)
        torch.set_num_threads(2)
        two = attention_kernel.attention(q, k, v, cu_q, cu_k, 0.125, causal=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, together) and torch.equal(two, together)
    noisy = k.clone()
    noisy[:257] = 1e4  # another segment's keys
    assert torch.equal(attention_kernel.attention(q, noisy, v, cu_q, cu_k, 0.125, causal=True)[257:], together[257:])


def test_bad_causal_and_grouped_arguments_are_named():
    q = torch.randn(10, 4, 64).bfloat16()
    kv = torch.randn(10, 3, 64).bfloat16()
    with pytest.raises(RuntimeError, match="that divides 4"):
        attention_kernel.attention(q, kv, kv, segment_offsets([10]), None, 1.0, causal=True)
    with pytest.raises(RuntimeError, match="causal segment 1 has 6 queries for 5 keys"):
        attention_kernel.attention(q, q[:9], q[:9], segment_offsets([4, 6]), segment_offsets([4, 5]), 1.0, causal=True)

"""fovea's AVX-512 BF16 encoder attention against softmax attention in float64 and against torch's SDPA in bfloat16
(the path it replaces): as close to float64 as SDPA is, segments independent of each other and of the threads,
bad arguments named."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fovea.kernels import encoder_attention as attention_kernel
from fovea.layers.encoder_attention import encoder_attention
from tests.kernels import BF16_STEP, requires_compiler, segment_offsets

pytestmark = [
    requires_compiler,
    pytest.mark.skipif(not attention_kernel.available(), reason="no AVX-512 BF16 on this CPU"),
]

def _per_segment(fn, q, k, v, cu_q, cu_k):
    return torch.cat([fn(q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]])
                      for i in range(len(cu_q) - 1)])


def _float64(scale):
    def attend(q, k, v):  # [L, H, D] each
        probs = (torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale).softmax(-1)
        return torch.einsum("hqk,khd->qhd", probs, v.double())
    return attend


def _sdpa(scale):
    def attend(q, k, v):
        out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), scale=scale)
        return out[0].transpose(0, 1)
    return attend


@pytest.mark.parametrize("head_dim, heads, q_lengths, k_lengths", [
    (64, 6, [257, 257, 257], None),  # BLIP-2's ViT-S/14: three images
    (64, 16, [577], None),  # CLIP ViT-L/14-336
    (80, 3, [5, 300, 0, 1], None),  # Qwen2.5-VL's head size, odd runs and an empty one
    (128, 2, [64, 64, 33], None),
    (18, 1, [700], None),  # three key blocks, a head size not a multiple of 16
    (8, 2, [3, 40], [7, 290]),  # cross-attention: keys of other lengths
])
def test_kernel_is_as_close_to_float64_as_sdpa_and_near_sdpa(head_dim, heads, q_lengths, k_lengths):
    gen = torch.Generator().manual_seed(head_dim * heads + len(q_lengths))
    k_lengths = k_lengths or q_lengths
    scale = head_dim**-0.5
    qkv = (torch.randn(sum(q_lengths), 3, heads, head_dim, generator=gen) * 2).bfloat16()
    q = qkv[:, 0]  # a strided view, as a packed projection's
    kv = (torch.randn(sum(k_lengths), 2, heads, head_dim, generator=gen) * 2).bfloat16()
    k, v = kv.unbind(1)
    cu_q, cu_k = segment_offsets(q_lengths), segment_offsets(k_lengths)
    got = attention_kernel.attention(q, k, v, cu_q, cu_k, scale)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape and got.is_contiguous()
    exact = _per_segment(_float64(scale), q, k, v, cu_q, cu_k)
    sdpa = _per_segment(_sdpa(scale), q, k, v, cu_q, cu_k)
    err, sdpa_err = (got.double() - exact).abs(), (sdpa.double() - exact).abs()
    assert err.mean() <= 1.1 * sdpa_err.mean()
    assert err.max() <= sdpa_err.max() + BF16_STEP * exact.abs().max()
    # against SDPA itself: a few bfloat16 steps of the outputs' scale where they differ at all
    assert (got.double() - sdpa.double()).abs().max() <= 4 * BF16_STEP * exact.abs().max()


def test_segments_do_not_see_each_other_and_threads_do_not_matter():
    gen = torch.Generator().manual_seed(3)
    lengths = [257, 100, 257]
    q, k, v = (torch.randn(sum(lengths), 4, 64, generator=gen).bfloat16() for _ in range(3))
    cu = segment_offsets(lengths)
    together = attention_kernel.attention(q, k, v, cu, None, 0.125)
    alone = attention_kernel.attention(q[257:357], k[257:357], v[257:357], segment_offsets([100]), None, 0.125)
    assert torch.equal(together[257:357], alone)  # a segment's bits do not depend on its batch
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = attention_kernel.attention(q, k, v, cu, None, 0.125)
        torch.set_num_threads(2)
        two = attention_kernel.attention(q, k, v, cu, None, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, together) and torch.equal(two, together)
    noisy = k.clone()
    noisy[:257] = 1e4  # another segment's keys
    assert torch.equal(attention_kernel.attention(q, noisy, v, cu, None, 0.125)[257:], together[257:])


def test_encoder_attention_runs_the_kernel_for_unmasked_bfloat16_and_sdpa_otherwise():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 257, 3 * 384, generator=gen).bfloat16()
    q, k, v = x.view(3, 257, 3, 384).unbind(2)  # BLIP's fused qkv
    got = encoder_attention(q, k, v, 6, 0.125)
    heads = [t.reshape(3 * 257, 6, 64) for t in (q, k, v)]
    assert torch.equal(got, attention_kernel.attention(*heads, attention_kernel.uniform_segments(3, 257), None,
                                                       0.125).view(3, 257, 384))
    # a mask, or float32: torch's SDPA, as before
    mask = torch.ones(3, 1, 1, 257, dtype=torch.bool)
    sdpa = encoder_attention(q, k, v, 6, 0.125, mask)
    assert not torch.equal(sdpa, got)
    torch.testing.assert_close(sdpa, got, rtol=0.02, atol=0.02)
    assert encoder_attention(q.float(), k.float(), v.float(), 6, 0.125).dtype == torch.float32


def test_bad_arguments_are_named():
    q = torch.randn(10, 2, 64).bfloat16()
    cu = segment_offsets([4, 6])
    with pytest.raises(RuntimeError, match="q must be a bfloat16"):
        attention_kernel.attention(q.float(), q, q, cu, None, 1.0)
    with pytest.raises(RuntimeError, match="cu_seqlens_q must run from 0 to the 10 rows"):
        attention_kernel.attention(q, q, q, segment_offsets([4, 5]), segment_offsets([4, 6]), 1.0)
    with pytest.raises(RuntimeError, match="must not decrease"):
        attention_kernel.attention(q, q, q, torch.tensor([0, 6, 4, 10]), None, 1.0)
    with pytest.raises(RuntimeError, match="int64"):
        attention_kernel.attention(q, q, q, cu.int(), None, 1.0)
    with pytest.raises(RuntimeError, match="segment 1 has 6 queries and no keys"):
        attention_kernel.attention(q, q[:4], q[:4], cu, segment_offsets([4, 0]), 1.0)
    with pytest.raises(RuntimeError, match="q's 2 heads of 64"):
        attention_kernel.attention(q, q.view(10, 4, 32), q.view(10, 4, 32), cu, None, 1.0)
    with pytest.raises(ValueError, match="scale must be positive"):
        attention_kernel.attention(q, q, q, cu, None, -0.125)
    with pytest.raises(RuntimeError, match="head_dim must be even"):
        odd = torch.randn(10, 2, 7).bfloat16()
        attention_kernel.attention(odd, odd, odd, cu, None, 1.0)

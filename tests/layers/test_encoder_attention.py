"""Encoder attention against softmax attention written out in float64: self- and cross-attention on a batch,
padding and full-pattern masks, dropout only when asked for, and packed runs that attend only within
themselves."""
from __future__ import annotations

import pytest
import torch

from fovea.layers.encoder_attention import PackedSegments, as_sdpa_mask, encoder_attention

H, D = 4, 8


def _reference(q, k, v, scale, may_attend=None):
    """q [B, Tq, H*D], k/v [B, Tk, H*D]; may_attend [B, Tq, Tk] bool or None -> [B, Tq, H*D], float64."""
    batch, rows, _ = q.shape
    q, k, v = (t.double().view(batch, -1, H, D) for t in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if may_attend is not None:
        scores = scores.masked_fill(~may_attend[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(batch, rows, H * D)


def test_cross_attention_with_padding_equals_formula_and_ignores_padded_keys():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 5, H * D, generator=gen)
    k, v = (torch.randn(3, 7, H * D, generator=gen) for _ in range(2))
    real = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])  # (B, keys)
    got = encoder_attention(q, k, v, H, 0.3, as_sdpa_mask(real))
    want = _reference(q, k, v, 0.3, real.bool()[:, None, :].expand(3, 5, 7))
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    noisy_k, noisy_v = k.clone(), v.clone()
    noisy_k[real == 0] = 1e3
    noisy_v[real == 0] = -1e3
    assert torch.equal(encoder_attention(q, noisy_k, noisy_v, H, 0.3, as_sdpa_mask(real)), got)
    # no mask: every key counts, so the padded rows change the result
    assert (encoder_attention(q, k, v, H, 0.3) - got).abs().max() > 1e-3


def test_self_attention_with_a_full_pattern_mask_equals_formula():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 3 * H * D, generator=gen)
    q, k, v = x.view(2, 6, 3, H * D).unbind(2)  # strided views, as BLIP's fused qkv gives them
    pattern = torch.ones(6, 6, dtype=torch.bool).tril().expand(2, 6, 6).clone()  # (B, rows, keys)
    pattern[1, :, 0] = False
    pattern[1, 0, 0] = True
    got = encoder_attention(q, k, v, H, D**-0.5, as_sdpa_mask(pattern))
    torch.testing.assert_close(got.double(), _reference(q, k, v, D**-0.5, pattern), rtol=0, atol=1e-5)


def test_dropout_only_when_asked_for():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 5, H * D, generator=gen) for _ in range(3))
    plain = encoder_attention(q, k, v, H, 0.5)
    torch.manual_seed(0)
    dropped = encoder_attention(q, k, v, H, 0.5, dropout_p=0.5)
    assert (dropped - plain).abs().max() > 1e-3
    torch.manual_seed(0)
    assert torch.equal(encoder_attention(q, k, v, H, 0.5, dropout_p=0.5), dropped)


def test_as_sdpa_mask_shapes():
    assert as_sdpa_mask(None) is None
    assert as_sdpa_mask(torch.ones(2, 5)).shape == (2, 1, 1, 5)
    assert as_sdpa_mask(torch.ones(2, 3, 5)).dtype == torch.bool
    assert as_sdpa_mask(torch.ones(2, 3, 5)).shape == (2, 1, 3, 5)
    with pytest.raises(ValueError, match="attention mask must be"):
        as_sdpa_mask(torch.ones(5))


@pytest.mark.parametrize("lengths", [[12], [4, 4, 4], [4, 6, 4, 0, 4], [6, 6, 2, 6], [3, 0, 5, 5, 5, 3]])
def test_packed_segments_attend_only_within_each_run(lengths):
    gen = torch.Generator().manual_seed(sum(lengths))
    q, k, v = (torch.randn(sum(lengths), 3, 8, generator=gen) for _ in range(3))
    got = PackedSegments(lengths).attend(q, k, v, scale=0.3)
    want, start = [], 0
    for n in lengths:  # each run on its own, in float64
        s = slice(start, start + n)
        probs = (torch.einsum("qhd,khd->hqk", q[s].double(), k[s].double()) * 0.3).softmax(-1)
        want.append(torch.einsum("hqk,khd->qhd", probs, v[s].double()))
        start += n
    torch.testing.assert_close(got.double(), torch.cat(want), rtol=0, atol=1e-5)

"""Attention without a KV cache (training, export): one sequence outside any context, a padded batch under
`DenseAttentionMetadata`, against causal attention written out in float64; activation checkpointing that
re-enters the mask; and a serving layer run outside its step's context is an error."""
from __future__ import annotations

import pytest
import torch

from fovea.layers.attention import Attention, DenseAttentionMetadata, checkpoint_in_context, forward_context
from tests.layers import causal_attention_float64

H, KV, D = 6, 2, 8


def _qkv(shape, gen):
    return tuple(torch.randn(*shape, h * D, generator=gen) for h in (H, KV, KV))


def test_padding_mask_is_causal_over_real_tokens_and_each_row_sees_itself():
    mask = DenseAttentionMetadata.from_padding(torch.tensor([[1, 1, 0], [0, 1, 1]])).mask
    assert mask.shape == (2, 1, 3, 3)
    assert mask[0, 0].int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]  # padding row 2 sees itself
    assert mask[1, 0].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]  # padding row 0 sees only itself


def test_one_sequence_outside_any_context_is_causal_attention():
    q, k, v = _qkv((11,), torch.Generator().manual_seed(0))
    got = Attention(H, D, D**-0.5, KV)(q, k, v)
    assert got.shape == (11, H * D)
    want = causal_attention_float64(q.view(11, H, D), k.view(11, KV, D), v.view(11, KV, D))
    torch.testing.assert_close(got.view(11, H, D).double(), want, rtol=0, atol=1e-5)


def test_padded_batch_equals_each_sequence_alone():
    gen = torch.Generator().manual_seed(1)
    q, k, v = _qkv((3, 9), gen)
    real = torch.ones(3, 9, dtype=torch.long)
    real[1, 6:] = 0  # right padding
    real[2, :4] = 0  # left padding
    attn = Attention(H, D, D**-0.5, KV)
    with forward_context(DenseAttentionMetadata.from_padding(real)):
        got = attn(q, k, v)
    assert got.shape == (3, 9, H * D) and got.isfinite().all()
    for b in range(3):
        rows = real[b].bool()
        n = int(rows.sum())
        want = causal_attention_float64(q[b, rows].view(n, H, D), k[b, rows].view(n, KV, D), v[b, rows].view(n, KV, D))
        torch.testing.assert_close(got[b, rows].view(n, H, D).double(), want, rtol=0, atol=1e-5)


def test_checkpointed_layer_recomputes_under_the_same_mask():
    gen = torch.Generator().manual_seed(2)
    proj = torch.nn.Linear(16, (H + 2 * KV) * D)
    torch.nn.init.normal_(proj.weight, generator=gen)
    attn = Attention(H, D, D**-0.5, KV)
    x = torch.randn(2, 7, 16, generator=gen)
    real = torch.ones(2, 7, dtype=torch.long)
    real[0, 4:] = 0

    def layer(inputs):
        return attn(*proj(inputs).split([H * D, KV * D, KV * D], dim=-1))

    grads = []
    for is_checkpointed in (False, True):
        proj.zero_grad()
        with forward_context(DenseAttentionMetadata.from_padding(real)):
            out = checkpoint_in_context(layer, x) if is_checkpointed else layer(x)
        (out[real.bool()] ** 2).sum().backward()  # backward after the context has exited
        grads.append(proj.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    assert torch.equal(grads[0], grads[1])


def test_a_layer_with_a_bound_cache_needs_its_step_context():
    attn = Attention(H, D, D**-0.5, KV)
    attn.kv_cache = (torch.zeros(8, KV, D), torch.zeros(8, KV, D))
    with pytest.raises(RuntimeError, match="forward_context"):
        attn(*_qkv((3,), torch.Generator().manual_seed(3)))

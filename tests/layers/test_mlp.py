"""GatedMLP against down(act(gate(x)) * up(x)) written out with separate gate/up matrices, on the fused-kernel
path (inference) and the plain path (autograd), and with gradients reaching every weight."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fovea.layers.mlp import GatedMLP


@pytest.mark.parametrize("act, fn", [("silu", F.silu), ("gelu_pytorch_tanh", lambda x: F.gelu(x, approximate="tanh"))])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_mlp_equals_formula(act, fn, bias):
    torch.manual_seed(0)
    mlp = GatedMLP(16, 24, act, bias=bias)
    for p in mlp.parameters():
        torch.nn.init.normal_(p)
    gate_w, up_w = mlp.gate_up_proj.weight.detach().split(24)
    gate_b, up_b = mlp.gate_up_proj.bias.detach().split(24) if bias else (None, None)
    x = torch.randn(5, 16)
    want = F.linear(fn(F.linear(x, gate_w, gate_b)) * F.linear(x, up_w, up_b), mlp.down_proj.weight.detach(),
                    None if not bias else mlp.down_proj.bias.detach())
    with torch.no_grad():  # the fused silu_mul kernel runs here when built
        torch.testing.assert_close(mlp(x), want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(mlp(x.view(1, 5, 16))[0], want, rtol=1e-5, atol=1e-4)  # batched [B, T, D]
    out = mlp(x.requires_grad_())
    torch.testing.assert_close(out.detach(), want, rtol=1e-5, atol=1e-4)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mlp.parameters())

"""T5's fused CPU kernels (layer norm over a float32 residual stream, gated tanh-GELU) against the torch formulas
they replace, rounding for rounding."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fovea import kernels
from fovea.kernels import t5_fused
from fovea.models.t5 import T5LayerNorm
from tests.kernels import requires_compiler

pytestmark = requires_compiler


def _close_or_one_step(got: torch.Tensor, want: torch.Tensor, max_fraction: float) -> None:
    """bfloat16: equal, but for a small fraction of entries one rounding step apart (a float32 sum's order or a
    last-bit difference before the rounding), or both within 1e-6 of 0 (GELU's far negative tail, where torch's
    1 + tanh cancels to 0 or leaves a last bit)."""
    differs = got != want
    assert differs.float().mean().item() <= max_fraction
    torch.testing.assert_close(got[differs].float(), want[differs].float(), rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                              (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("rows, dim", [(1, 768), (37, 64), (300, 1000), (5, 13)])
def test_t5_layer_norm_kernel_equals_the_torch_formula(x_dtype, w_dtype, rows, dim):
    gen = torch.Generator().manual_seed(rows * dim)
    x = (torch.randn(rows, dim + 8, generator=gen) * 3)[:, 4:4 + dim].to(x_dtype)  # strided rows too
    norm = T5LayerNorm(dim, eps=1e-6).to(w_dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(dim, generator=gen))
    got = t5_fused.t5_layer_norm(x, norm.weight.detach(), 1e-6)
    want = norm.reference(x).detach()
    assert got.dtype == w_dtype and got.shape == want.shape
    if w_dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    else:
        _close_or_one_step(got, want, 0.01)


def test_t5_layer_norm_refuses_a_weight_wider_than_its_input():
    with pytest.raises(RuntimeError, match="t5_layer_norm"):
        t5_fused.t5_layer_norm(torch.randn(2, 8, dtype=torch.bfloat16), torch.ones(8), 1e-6)


def test_t5_layer_norm_module_uses_the_kernel_at_inference_and_torch_under_autograd():
    norm = T5LayerNorm(32, eps=1e-6).to(torch.bfloat16).requires_grad_(False)  # as loaded for serving
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 32))
    x = torch.randn(4, 32) * 2  # float32 residual stream, bfloat16 weight: the kernel's case
    # the module dispatches on `can_fuse`, which refuses a parameter that requires grad: a module built by hand
    # keeps torch's formula unless it is frozen, as loading does (checked here, so this test runs the kernel's path)
    assert kernels.can_fuse(x, norm.weight)
    with torch.inference_mode():
        fused = norm(x)
        assert torch.equal(fused, t5_fused.t5_layer_norm(x, norm.weight, 1e-6))
    norm.requires_grad_(True)
    x.requires_grad_(True)
    assert not kernels.can_fuse(x, norm.weight)
    plain = norm(x)  # autograd: the torch formula
    plain.float().sum().backward()
    assert x.grad is not None and norm.weight.grad is not None
    _close_or_one_step(fused, plain.detach(), 0.05)


@pytest.mark.parametrize("rows, dim", [(1, 768), (37, 64), (5, 13)])
def test_t5_layer_norm_with_residual_adds_as_torch_and_norms_as_the_kernel(rows, dim):
    """forward(x, residual) in bfloat16: the stream is torch's `residual + x` bit for bit (written into x's buffer),
    the normed rows the norm kernel's of that stream bit for bit; float32 (torch's ops) adds out of place."""
    gen = torch.Generator().manual_seed(rows + dim)
    norm = T5LayerNorm(dim, eps=1e-6).to(torch.bfloat16).requires_grad_(False)  # as loaded for serving
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(dim, generator=gen))
    x = (torch.randn(rows, dim, generator=gen) * 3).bfloat16()
    residual = (torch.randn(rows, dim, generator=gen) * 20).bfloat16()
    want_stream = residual + x
    with torch.inference_mode():
        normed, stream = norm(x.clone(), residual)
        assert torch.equal(stream, want_stream)
        assert torch.equal(normed, t5_fused.t5_layer_norm(want_stream, norm.weight, 1e-6))
        x_buffer = x.clone()
        assert norm(x_buffer, residual)[1].data_ptr() == x_buffer.data_ptr()  # in place: no new stream tensor
    norm32 = T5LayerNorm(dim, eps=1e-6)
    x32, residual32 = x.float(), residual.float()
    normed32, stream32 = norm32(x32, residual32)
    assert torch.equal(stream32, residual32 + x32) and torch.equal(x32, x.float())
    assert torch.equal(normed32, norm32.reference(residual32 + x32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, width", [(1, 2048), (33, 100), (7, 13), (64, 1536)])
def test_gelu_tanh_mul_kernel_equals_the_torch_formula(dtype, rows, width):
    gen = torch.Generator().manual_seed(rows + width)
    a = (torch.randn(rows, width + 3, generator=gen) * 4)[:, :width].to(dtype)  # strided rows, wide range
    b = torch.randn(rows, width, generator=gen).to(dtype)
    a[0, :min(width, 6)] = torch.tensor([0.0, -0.0, 1e-30, -20.0, 20.0, -3.0])[:min(width, 6)].to(dtype)
    got = t5_fused.gelu_tanh_mul(a, b)
    want = F.gelu(a, approximate="tanh") * b
    assert got.dtype == dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:
        _close_or_one_step(got, want, 0.02)


def test_gelu_tanh_mul_refuses_mismatched_inputs():
    with pytest.raises(RuntimeError, match="match"):
        t5_fused.gelu_tanh_mul(torch.randn(2, 8), torch.randn(2, 9))

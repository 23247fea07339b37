"""The fused CPU kernels (RMSNorm, rotary, SiLU-and-multiply, first argmax) against the torch formulas they replace,
rounding for rounding."""
from __future__ import annotations

import pytest
import torch

from fovea import kernels
from fovea.layers.norms import RMSNorm, rms_norm_reference
from fovea.layers.rotary import apply_rotary, apply_rotary_packed
from tests.kernels import requires_compiler

pytestmark = requires_compiler


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, dim", [(1, 896), (37, 64), (300, 1280), (5, 13)])
def test_rms_norm_kernel_equals_the_torch_formula(dtype, rows, dim):
    gen = torch.Generator().manual_seed(rows * dim)
    x = (torch.randn(rows, dim + 8, generator=gen) * 3)[:, 4:4 + dim].to(dtype)  # strided rows too
    weight = (1 + torch.randn(dim, generator=gen)).to(dtype)
    got = kernels.rms_norm(x, weight, 1e-6)
    want = rms_norm_reference(x, weight, 1e-6)
    assert got.dtype == dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    else:
        # the only freedom is the float32 sum's order: at most one bf16 step, and rarely
        differs = got != want
        assert differs.float().mean().item() < 0.01
        torch.testing.assert_close(got[differs].float(), want[differs].float(), rtol=1e-2, atol=0)


def test_rms_norm_module_uses_the_kernel_at_inference_and_torch_under_autograd():
    norm = RMSNorm(32, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 32))
    x = torch.randn(4, 32)
    with torch.inference_mode():
        fused = norm(x)
    x.requires_grad_(True)
    plain = norm(x)  # autograd: the torch formula
    plain.sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(fused, plain.detach(), rtol=2e-6, atol=1e-6)


def _torch_rotary(qkv, cos, sin, num_heads):
    width = num_heads * cos.shape[-1]
    rotated = qkv[:, :width]
    if cos.dtype != qkv.dtype:
        rotated = apply_rotary(rotated.float(), cos, sin).to(qkv.dtype)
    else:
        rotated = apply_rotary(rotated, cos, sin)
    return torch.cat([rotated, qkv[:, width:]], dim=1)


@pytest.mark.parametrize("qkv_dtype, cos_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                  (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("head_dim, num_q, num_kv", [(64, 14, 2), (16, 4, 4), (128, 2, 1)])
def test_rotary_kernel_equals_the_torch_formula_bit_for_bit(qkv_dtype, cos_dtype, head_dim, num_q, num_kv):
    gen = torch.Generator().manual_seed(head_dim + num_q)
    rows = 23
    qkv = (torch.randn(rows, (num_q + 2 * num_kv) * head_dim, generator=gen) * 4).to(qkv_dtype)
    angles = torch.randn(rows, head_dim // 2, generator=gen) * 50
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().to(cos_dtype), angles.sin().to(cos_dtype)
    want = _torch_rotary(qkv, cos, sin, num_q + num_kv)
    got = apply_rotary_packed(qkv.clone(), cos, sin, num_q + num_kv)
    assert torch.equal(got, want)  # v columns untouched, q and k rounded as torch rounds them


def test_rotary_packed_falls_back_to_torch_with_the_kernels_off():
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(5, 6 * 8, generator=gen).bfloat16()
    angles = torch.randn(5, 8, generator=gen)
    cos, sin = angles.cos(), angles.sin()
    fused = apply_rotary_packed(qkv.clone(), cos, sin, 4)
    kernels.set_mode("off")
    assert not kernels.can_fuse(qkv, cos, sin)
    plain = apply_rotary_packed(qkv.clone(), cos, sin, 4)
    assert torch.equal(fused, plain) and torch.equal(plain, _torch_rotary(qkv, cos, sin, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_kernel_equals_silu_gate_times_up(dtype):
    gen = torch.Generator().manual_seed(5)
    gate_up = (torch.randn(33, 2 * 300, generator=gen) * 6).to(dtype)
    gate_up[0, :6] = torch.tensor([0.0, -90.0, 90.0, 1e-30, -1e-30, 20.0])  # the exp's clamps and tiny values
    got = kernels.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    assert got.dtype == dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-30)
    else:  # a polynomial exp, not torch's: at most one bfloat16 step, and rarely
        differs = got != want
        assert differs.float().mean().item() < 0.01
        torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_argmax_kernel_equals_argmax_with_ties_infinities_and_nan(dtype):
    gen = torch.Generator().manual_seed(6)
    values = torch.randint(-5, 6, (9, 1000), generator=gen).to(dtype)  # many ties: the first one counts
    values[1] = float("-inf")  # every entry the same: index 0
    values[2, 700] = float("inf")
    values[3, [10, 600]] = float("nan")  # the first NaN, as torch
    values[4, 999] = 100.0  # in the last, partial chunk of the scan
    values[5, 255:257] = 50.0  # on a chunk boundary
    wide = torch.randn(4, 151936, generator=gen).to(dtype)
    for x in (values, wide, values[:, ::1][:, :700], torch.randn(3, 2000, generator=gen).to(dtype)[:, 500:]):
        assert torch.equal(kernels.first_argmax(x), x.argmax(dim=-1))
    with pytest.raises(RuntimeError, match="contiguous rows"):
        kernels.first_argmax(values[:, ::2])

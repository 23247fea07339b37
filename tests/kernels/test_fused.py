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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, dim", [(1, 896), (37, 64), (300, 1280), (5, 13)])
def test_add_rms_norm_kernel_equals_torch_add_then_rms_norm_bit_for_bit(dtype, rows, dim):
    gen = torch.Generator().manual_seed(rows + dim)
    x = (torch.randn(rows, dim + 6, generator=gen) * 3)[:, 2:2 + dim].to(dtype)  # strided rows
    residual = (torch.randn(rows, dim + 3, generator=gen) * 20)[:, :dim].to(dtype)
    weight = (1 + torch.randn(dim, generator=gen)).to(dtype)
    before = residual.clone()
    want_sum = x + residual  # torch's add in x's dtype: one rounding per element
    got = kernels.add_rms_norm_(x, residual, weight, 1e-6)
    assert torch.equal(x, want_sum) and torch.equal(residual, before)  # the sum in x's buffer, residual read only
    assert torch.equal(got, kernels.rms_norm(want_sum, weight, 1e-6))  # the same row function as rms_norm
    if dtype == torch.float32:
        torch.testing.assert_close(got, rms_norm_reference(want_sum, weight, 1e-6), rtol=2e-6, atol=1e-6)


def test_add_rms_norm_kernel_names_bad_arguments():
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(RuntimeError, match="residual must be"):
        kernels.add_rms_norm_(x, torch.randn(4, 9), w, 1e-6)
    with pytest.raises(RuntimeError, match="residual must be"):
        kernels.add_rms_norm_(x, torch.randn(4, 8).bfloat16(), w, 1e-6)
    with pytest.raises(RuntimeError, match="weight"):
        kernels.add_rms_norm_(x, torch.randn(4, 8), torch.randn(7), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_module_with_residual_fused_equals_the_torch_formula(dtype):
    norm = RMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 48))
    gen = torch.Generator().manual_seed(8)
    x, residual = (torch.randn(7, 48, generator=gen) * 4).to(dtype), torch.randn(7, 48, generator=gen).to(dtype)
    want_sum = x + residual
    want = rms_norm_reference(want_sum, norm.weight.detach(), 1e-5)
    with torch.inference_mode():
        got, got_sum = norm(x.clone(), residual)
    assert torch.equal(got_sum, want_sum)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=0)
    kernels.set_mode("off")  # the torch formula: the same sum, x left as it was
    x_before = x.clone()
    plain, plain_sum = norm(x, residual)
    assert torch.equal(plain_sum, want_sum) and torch.equal(x, x_before)
    assert torch.equal(plain, want.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_kernel_equals_index_copy(dtype):
    gen = torch.Generator().manual_seed(9)
    num_slots, kv_heads, head_dim, rows = 40, 3, 10, 6
    qkv = torch.randn(rows, (4 + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    k, v = qkv[:, 40:70], qkv[:, 70:]  # views of a packed row, as the attention layer gets them
    slots = torch.tensor([39, 0, 17, 5, 6, 22])
    k_cache, v_cache = torch.randn(num_slots, kv_heads, head_dim, generator=gen).to(dtype), \
        torch.randn(num_slots, kv_heads, head_dim, generator=gen).to(dtype)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_k.index_copy_(0, slots, k.reshape(rows, kv_heads, head_dim))
    want_v.index_copy_(0, slots, v.reshape(rows, kv_heads, head_dim))
    kernels.write_kv_(k_cache, v_cache, slots, k, v)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


def test_write_kv_kernel_refuses_bad_slots_and_shapes_before_writing():
    k_cache, v_cache = torch.zeros(8, 2, 4), torch.zeros(8, 2, 4)
    k, v = torch.ones(2, 8), torch.ones(2, 8)
    with pytest.raises(RuntimeError, match=r"slot_mapping\[1\] = 8 is outside the cache's 8 slots"):
        kernels.write_kv_(k_cache, v_cache, torch.tensor([3, 8]), k, v)
    with pytest.raises(RuntimeError, match=r"slot_mapping\[0\] = -1"):
        kernels.write_kv_(k_cache, v_cache, torch.tensor([-1, 2]), k, v)
    assert not k_cache.any() and not v_cache.any()  # nothing written
    with pytest.raises(RuntimeError, match="one dtype"):
        kernels.write_kv_(k_cache, v_cache, torch.tensor([0, 1]), k.bfloat16(), v.bfloat16())
    with pytest.raises(RuntimeError, match=r"\[N, kv_heads \* head_dim\]"):
        kernels.write_kv_(k_cache, v_cache, torch.tensor([0, 1]), torch.ones(2, 7), v)
    with pytest.raises(RuntimeError, match="int64"):
        kernels.write_kv_(k_cache, v_cache, torch.tensor([0, 1], dtype=torch.int32), k, v)

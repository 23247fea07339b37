"""int8 arithmetic against float64 computed from the SAME int8 weights and scales (so only the kernels'
rounding is measured, never the quantization error), and the quantizers against their definitions."""
from __future__ import annotations

import pytest
import torch

from fovea.layers.linear import Linear, PackedLinear, prepare_linear_layer
from fovea.layers.quantization.int8 import (
    INT8_MM_MAX_ROWS,
    Int8LinearMethod,
    int8_dynamic_linear,
    int8_weight_only_linear,
    quantize_activation_per_token,
    quantize_weight_per_channel,
    unpack_int8_from_int32,
)


def random_int8(shape, seed):
    return torch.randint(-128, 128, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


def test_weight_quantizer_is_symmetric_per_row_and_nearest():
    w = torch.randn(37, 50, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 37)[:, None]
    w[5] = 0  # an all-zero row
    q, scale = quantize_weight_per_channel(w, torch.float32)
    assert q.dtype == torch.int8 and scale.shape == (37,)
    assert q.abs().max() == 127 and int(q.min()) >= -127
    assert torch.equal(q.abs().amax(dim=1)[torch.arange(37) != 5], torch.full((36,), 127, dtype=torch.int8))
    assert torch.equal(q[5], torch.zeros(50, dtype=torch.int8)) and scale[5] == 1
    # each q is the nearest integer to w / scale: the error is at most half a step
    assert ((q.double() * scale.double()[:, None] - w.double()).abs() <= scale.double()[:, None] / 2 + 1e-12).all()
    _, bf16_scale = quantize_weight_per_channel(w, torch.bfloat16)
    assert bf16_scale.dtype == torch.bfloat16


def test_activation_quantizer_follows_compressed_tensors():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    x = torch.randn(9, 40, generator=torch.Generator().manual_seed(1)) * 3
    x[4] = 0
    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    scale, zero_point = compute_dynamic_scales_and_zp(x.unsqueeze(0), args, module=None)
    q, got_scale = quantize_activation_per_token(x)
    assert torch.equal(got_scale, scale[0])
    assert torch.equal(q.float() * got_scale, fake_quantize(x.unsqueeze(0), scale, zero_point, args)[0])
    assert int(q.min()) == -128 or int(q.max()) == 127


@pytest.mark.parametrize("rows", [1, 5, INT8_MM_MAX_ROWS, INT8_MM_MAX_ROWS + 1, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("k", [96, 99], ids=["K=96", "K=99"])
def test_weight_only_linear_matches_float64(rows, dtype, has_bias, k):
    """Both paths: torch's int8 kernel (bfloat16, few rows, K a multiple of 16: it crashes the process
    otherwise) and dequantize + GEMM."""
    n = 41
    q = random_int8((n, k), 2)
    scale = (torch.rand(n, generator=torch.Generator().manual_seed(3)) * 0.02 + 1e-3).to(dtype)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(4)).to(dtype)
    bias = (torch.randn(n) * 0.1).to(dtype) if has_bias else None
    want = x.double() @ (q.double() * scale.double()[:, None]).T
    if bias is not None:
        want += bias.double()
    got = int8_weight_only_linear(x, q, scale, bias)
    assert got.dtype == dtype and got.shape == (rows, n)
    # float32: a K=96 sum of products, each rounded once; bfloat16: the output itself has 8 significant bits
    rel = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert (got.double() - want).abs().max() <= rel * want.abs().max()


@pytest.mark.parametrize("rows", [1, 3, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dynamic_linear_is_exact_integer_arithmetic(rows, dtype):
    k, n = 72, 24
    q = random_int8((n, k), 5)
    scale = (torch.rand(n, generator=torch.Generator().manual_seed(6)) * 0.02 + 1e-3).to(dtype)
    x = (torch.randn(rows, k, generator=torch.Generator().manual_seed(7)) * 2).to(dtype)
    bias = (torch.randn(n) * 0.1).to(dtype)
    qx, x_scale = quantize_activation_per_token(x)
    # the int32 accumulation is exact; the float64 reference of the same integers and scales
    want = (qx.double() @ q.double().T) * x_scale.double() * scale.double() + bias.double()
    got = int8_dynamic_linear(x, q, scale, bias)
    rel = 1e-6 if dtype == torch.float32 else 2 ** -7
    assert got.dtype == dtype
    assert (got.double() - want).abs().max() <= rel * want.abs().max()


def test_pack_quantized_layout_round_trips_with_compressed_tensors():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    q = random_int8((6, 64), 8)
    assert torch.equal(unpack_int8_from_int32(pack_to_int32(q, 8), 64), q)


def test_int8_method_on_a_layer():
    """A layer built dense, loaded, then prepared with the int8 method: runs int8, says so, saves dense."""
    torch.manual_seed(0)
    layer = PackedLinear(48, {"q_proj": 16, "k_proj": 8, "v_proj": 8}, bias=True)
    dense_weight = layer.weight.detach().clone()
    layer.method = Int8LinearMethod()
    prepare_linear_layer(layer)
    assert "method=int8" in repr(layer)
    assert "weight" not in layer._parameters and layer.int8_weight.dtype == torch.int8
    q, scale = quantize_weight_per_channel(dense_weight, torch.float32)
    assert torch.equal(layer.int8_weight, q) and torch.equal(layer.int8_scale, scale)
    x = torch.randn(3, 48)
    assert torch.allclose(layer(x), x @ (q.float() * scale[:, None]).T + layer.bias, atol=1e-5)
    saved = layer.state_dict()
    assert torch.equal(saved["weight"], q.float() * scale[:, None])
    assert (saved["weight"] - dense_weight).abs().max() <= scale.max() / 2 + 1e-7
    tied = Linear(48, 16, bias=False)
    tied.method = Int8LinearMethod()
    prepare_linear_layer(tied, keep_weight=True)  # a tied lm_head: the embedding still needs the dense weight
    assert "weight" in tied._parameters and tied.int8_weight.shape == (16, 48)

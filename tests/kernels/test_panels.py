"""The packed layout fovea's AMX and AVX-512 BF16 kernels share (`fovea.kernels.panels`) and the one method base
that packs it (`PanelLinearMethod`): pure torch, so checked on every CPU, including the AMX side that cannot run
here (tests/kernels/test_amx_linear.py runs its kernel where the CPU has AMX)."""
import pytest
import torch

from fovea.kernels import amx_linear, bf16_linear, panels
from fovea.layers.linear import Linear
from fovea.layers.linear_methods import AMXLinearMethod, BF16LinearMethod, PanelLinearMethod


@pytest.mark.parametrize("n, k", [(1, 1), (1, 33), (31, 1), (33, 70), (17, 95), (64, 96), (100, 130)])
def test_pack_unpack_round_trip_on_odd_shapes(n, k):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k)).bfloat16()
    packed = panels.pack_weight(w)
    assert packed.shape == (panels.padded(n) // 32, panels.padded(k) // 32, 2, 16, 16, 2)
    assert packed.is_contiguous() and packed.dtype == torch.bfloat16
    assert torch.equal(panels.unpack_weight(packed, n, k), w)
    assert packed.count_nonzero() == w.count_nonzero()  # the padding is zeros, nothing else is added


def test_both_kernels_take_the_one_layout():
    # a packed copy serves either kernel on an AMX host: the same function, the same bytes
    assert bf16_linear.pack_weight is panels.pack_weight and bf16_linear.unpack_weight is panels.unpack_weight
    assert amx_linear.BLOCK == bf16_linear.BLOCK == panels.BLOCK == 32
    w = torch.randn(64, 96).bfloat16()
    assert torch.equal(amx_linear.pack_weight(w), panels.pack_weight(w))


@pytest.mark.parametrize("shape", [(40, 64), (64, 70), (64,)])
def test_amx_pack_refuses_what_its_kernel_cannot_read(shape):
    # the AMX kernel writes every packed column, so padded panels would give it extra outputs
    with pytest.raises(ValueError, match=r"N and K multiples of 32; got \[" + ", ".join(map(str, shape))):
        amx_linear.pack_weight(torch.zeros(shape, dtype=torch.bfloat16))


@pytest.mark.parametrize("method_cls, out_features, in_features",
                         [(BF16LinearMethod, 40, 70), (BF16LinearMethod, 1, 3), (AMXLinearMethod, 64, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_panel_methods_pack_and_give_back_the_checkpoint(method_cls, out_features, in_features, bias):
    # pack and unpack only, which do not call a kernel: the AMX method's are checked here too
    torch.manual_seed(0)
    layer = Linear(in_features, out_features, bias=bias, dtype=torch.bfloat16)
    weight, layer_bias = layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone()
    method = method_cls()
    assert isinstance(method, PanelLinearMethod)
    packed = method.pack(layer.weight.detach(), layer)
    assert torch.equal(packed, panels.pack_weight(weight))
    if bias:
        assert layer.panel_bias.dtype == torch.float32 and torch.equal(layer.panel_bias, layer_bias.float())
    else:
        assert layer.panel_bias is None
    assert torch.equal(method.unpack(packed, layer), weight)

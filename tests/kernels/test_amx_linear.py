"""fovea's AMX bfloat16 linear kernel: the packed layout, results against a float32 matmul of the same inputs,
rows independent of the batch around them, the same result on 1 and 2 threads, clear errors, and which
loaded layers run it. They run where the CPU has AMX-BF16 (Intel Sapphire Rapids and later) and skip elsewhere;
the kernel itself is compiled on every x86-64 host (tests/kernels/test_runtime.py checks it is there)."""
import pytest
import torch
from torch import nn

from fovea import kernels
from fovea.kernels import amx_linear
from fovea.kernels.runtime import AMX_DENIED, cpu_has_amx
from fovea.layers.linear import Linear, prepare_linear_layer, prepare_linear_layers
from tests.kernels import requires_compiler

pytestmark = [requires_compiler, pytest.mark.skipif(not cpu_has_amx(), reason="this CPU has no AMX-BF16")]


@pytest.fixture(autouse=True)
def _tile_state_granted():
    if kernels.status().amx_linear.reason == AMX_DENIED:
        pytest.skip(AMX_DENIED)  # the OS's choice; a build failure is not skipped (require mode raises)
    assert amx_linear.available(), kernels.status().summary()


def _inputs(rows, k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).div(k ** 0.5).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    return x, w, b


def test_pack_weight_puts_each_element_where_the_tile_multiply_reads_it():
    n, k = 64, 96
    w = torch.arange(n * k).reshape(n, k)  # every element its own value
    packed = amx_linear.pack_weight(w)
    assert packed.shape == (2, 3, 2, 16, 16, 2)
    for p, s, h, r, col, e in [(0, 0, 0, 0, 0, 0), (1, 2, 1, 15, 15, 1), (0, 1, 1, 3, 7, 0), (1, 0, 0, 9, 2, 1)]:
        assert packed[p, s, h, r, col, e] == w[32 * p + 16 * h + col, 32 * s + 2 * r + e]


@pytest.mark.parametrize("rows", [1, 7, 16, 17, 31, 32, 33, 80, 300])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_a_float32_matmul_of_the_same_inputs(rows, with_bias):
    # 300 rows: several row blocks, a partial last one, streaming stores
    x, w, b = _inputs(rows, 160, 96)
    bias = b.float() if with_bias else None
    got = amx_linear.linear(x, amx_linear.pack_weight(w), bias)
    exact = x.double() @ w.double().T + (0 if bias is None else bias.double())
    # one bfloat16 rounding (<= 1 ulp <= 2^-7 relative, either neighbour) plus float32 summation error
    bound = exact.abs() * 2 ** -7 + (x.double().abs() @ w.double().abs().T) * 2 ** -20
    assert got.shape == (rows, 96) and got.dtype == torch.bfloat16
    assert ((got.double() - exact).abs() <= bound).all()


def test_each_row_is_computed_alone():
    # any row block size (one or two row tiles, padded or not) gives a row the same bits
    x, w, b = _inputs(70, 64, 128, seed=1)
    packed = amx_linear.pack_weight(w)
    together = amx_linear.linear(x, packed, b.float())
    alone = torch.cat([amx_linear.linear(x[i:i + 1], packed, b.float()) for i in range(70)])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("rows", [5, 600])
def test_two_threads_compute_every_panel_once(rows):
    # the threads share the panels through a counter; each output element is written by exactly one of them
    x, w, b = _inputs(rows, 96, 32 * 70, seed=2)
    packed = amx_linear.pack_weight(w)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = amx_linear.linear(x, packed, b.float())
        torch.set_num_threads(2)
        two = amx_linear.linear(x, packed, b.float())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_leading_dims_non_contiguous_input_and_no_rows():
    x, w, b = _inputs(12, 64, 32, seed=3)
    packed = amx_linear.pack_weight(w)
    flat = amx_linear.linear(x, packed, b.float())
    assert torch.equal(amx_linear.linear(x.reshape(3, 4, 64), packed, b.float()), flat.reshape(3, 4, 32))
    wide = torch.zeros(12, 128, dtype=torch.bfloat16)
    wide[:, ::2] = x
    assert torch.equal(amx_linear.linear(wide[:, ::2], packed, b.float()), flat)
    assert amx_linear.linear(x[:0], packed, None).shape == (0, 32)


def test_bad_inputs_are_named():
    x, w, b = _inputs(4, 64, 32)
    packed = amx_linear.pack_weight(w)
    with pytest.raises(RuntimeError, match="x has 32 columns; the packed weight takes 64"):
        amx_linear.linear(x[:, :32], packed, None)
    with pytest.raises(RuntimeError, match="contiguous bfloat16"):
        amx_linear.linear(x.float(), packed, None)
    with pytest.raises(RuntimeError, match="bias must be a contiguous float32"):
        amx_linear.linear(x, packed, b)


def test_loaded_supported_bfloat16_layers_run_the_kernel():
    torch.manual_seed(0)
    model = nn.Sequential(Linear(64, 96, dtype=torch.bfloat16), Linear(96, 40, dtype=torch.bfloat16),
                          Linear(40, 32, dtype=torch.float32))
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        expected = model[0](x)
        assert prepare_linear_layers(model) == 3
        got = model[0](x)
    assert [layer.method.name for layer in model] == ["amx", "onednn", "onednn"]  # N = 40; float32
    assert "method=amx" in repr(model[0])
    assert (got.float() - expected.float()).abs().max() <= 0.02 * expected.float().abs().max()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) and state[k].dtype == v.dtype for k, v in dense.items())
    kernels.set_mode("off")  # torch's own ops only: the layer stays dense
    off = Linear(64, 96, dtype=torch.bfloat16)
    assert not prepare_linear_layer(off) and off.method.name == "dense"

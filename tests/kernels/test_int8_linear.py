"""fovea's int8 weight-only kernel (W8A16, AVX-512 BF16): the packed layout, results against float64 of the same
int8 weights, scales and bfloat16 inputs on odd shapes (K not a multiple of 64 or even of 2, N not a multiple of
16, rows 1-70 across the 6-row register blocks and the cached-panel path), rows independent of their batch, the
same bits on 1 and 2 threads, clear errors, and which loaded layers run it. They run where the CPU has AVX-512
BF16 (AMD Zen 4, Intel Sapphire Rapids) and skip elsewhere."""
import pytest
import torch

from fovea import kernels
from fovea.kernels import int8_linear
from fovea.kernels.runtime import cpu_has_avx512_bf16
from fovea.layers.linear import Linear, prepare_linear_layer
from fovea.layers.quantization.int8 import Int8LinearMethod, int8_weight, quantize_weight_per_channel
from tests.kernels import requires_compiler

pytestmark = [requires_compiler,
              pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="this CPU has no AVX-512 BF16")]


@pytest.fixture(autouse=True)
def _kernel_runs():
    assert int8_linear.available(), kernels.status().summary()


def _inputs(rows, k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).bfloat16()
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, generator=g) * 0.02 + 1e-3).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    return x, q, scale, bias


def _bound(x, q, scale, bias, exact):
    """One bfloat16 rounding of the result (at most half a step: 2^-8 relative), float32 summation error (K
    terms, each sum rounded: K * 2^-24 of the sum of magnitudes), the scale multiply and bias add in float32."""
    magnitude = (x.double().abs() @ q.double().abs().T) * scale.double().abs()
    return exact.abs() * 2 ** -8 + magnitude * x.shape[1] * 2 ** -24 + bias.double().abs() * 2 ** -23 + 1e-30


def test_pack_weight_puts_each_element_where_the_kernel_reads_it():
    n, k = 41, 99  # N not a multiple of 32, K odd: padded with zeros
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    q[0, 0], q[1, 0], q[2, 0], q[3, 0] = -128, 127, -127, 0  # the codes' edges
    packed = int8_linear.pack_weight(q)
    assert packed.shape == (2, 50, 64) and packed.dtype == torch.uint8 and packed.is_contiguous()

    def code(value):  # sign-magnitude, 0x80 for -128
        return 0x80 if value == -128 else 0x80 | -value if value < 0 else value

    # byte 16l + i of a step: weight 2n + e = 8l + i (i < 8: columns 0-15) or 32 + 8l + i - 8 (columns 16-31)
    for p, s, col, e in [(0, 0, 0, 0), (0, 0, 1, 0), (0, 0, 2, 0), (0, 0, 3, 0), (1, 4, 8, 1), (0, 49, 31, 0),
                         (1, 20, 3, 0), (0, 7, 16, 1), (1, 30, 4, 1), (0, 2, 27, 0)]:
        j = 2 * col + e
        byte = 16 * (j // 8) + j % 8 if j < 32 else 16 * ((j - 32) // 8) + 8 + (j - 32) % 8
        assert packed[p, s, byte] == code(int(q[32 * p + col, 2 * s + e])), (p, s, col, e)
    assert sorted(int8_linear.STEP_ORDER.tolist()) == list(range(64))
    assert torch.equal(int8_linear.unpack_weight(packed, n, k), q)
    dense = int8_linear.unpack_weight(packed, 64, 100)  # the padding: zeros
    assert (dense[n:] == 0).all() and (dense[:, k:] == 0).all()


@pytest.mark.parametrize("k,n", [(64, 32), (97, 33)], ids=str)
def test_every_int8_value_is_widened_exactly(k, n):
    # all 256 values, -128 and 0 included, in every column and k position: the table look-up against float64
    g = torch.Generator().manual_seed(5)
    q = (torch.randperm(n * k, generator=g) % 256 - 128).to(torch.int8).view(n, k)
    assert set(q.flatten().tolist()) == set(range(-128, 128))
    packed = int8_linear.pack_weight(q)
    scale = torch.ones(n, dtype=torch.bfloat16)
    for i in range(k):  # x = e_i picks column k = i of every output: y[0, n] = q[n, i], exact in bfloat16
        x = torch.zeros(1, k, dtype=torch.bfloat16)
        x[0, i] = 1
        assert torch.equal(int8_linear.linear(x, packed, n, scale, None)[0], q[:, i].bfloat16()), i


@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, 24, 64, 70])
@pytest.mark.parametrize("k,n", [(97, 33), (130, 41), (64, 16), (200, 100)], ids=lambda v: str(v))
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_float64_of_the_same_int8_weights(rows, k, n, with_bias):
    x, q, scale, bias = _inputs(rows, k, n, seed=rows * 1000 + k + n)
    bias = bias if with_bias else None
    got = int8_linear.linear(x, int8_linear.pack_weight(q), n, scale, bias)
    exact = (x.double() @ q.double().T) * scale.double() + (0 if bias is None else bias.double())
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    zero = torch.zeros(n, dtype=torch.bfloat16)
    assert ((got.double() - exact).abs() <= _bound(x, q, scale, zero if bias is None else bias, exact)).all()


def test_each_row_is_computed_alone():
    # register blocks of 6, the first widening the panel and later ones reading it back: the same bits
    x, q, scale, bias = _inputs(70, 97, 70, seed=1)
    packed = int8_linear.pack_weight(q)
    together = int8_linear.linear(x, packed, 70, scale, bias)
    alone = torch.cat([int8_linear.linear(x[i:i + 1], packed, 70, scale, bias) for i in range(70)])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("k", [64, 66, 68, 70, 69])
def test_a_row_gets_the_same_bits_from_every_loop(k):
    # 1 row streams each panel in address order, 4 k pairs a round and a tail of 0-3 (these K give each tail);
    # 2-6 rows stream with the software prefetch; more widen each panel once and run the row blocks from it.
    # Every row of every batch size: the bits of that row alone, within the float64 bound
    x, q, scale, bias = _inputs(14, k, 45, seed=k)
    packed = int8_linear.pack_weight(q)
    alone = torch.cat([int8_linear.linear(x[i:i + 1], packed, 45, scale, bias) for i in range(14)])
    exact = (x.double() @ q.double().T) * scale.double() + bias.double()
    assert ((alone.double() - exact).abs() <= _bound(x, q, scale, bias, exact)).all()
    for rows in range(2, 15):
        assert torch.equal(int8_linear.linear(x[:rows], packed, 45, scale, bias), alone[:rows]), rows


@pytest.mark.parametrize("rows", [1, 40])
def test_two_threads_compute_every_panel_once(rows):
    x, q, scale, bias = _inputs(rows, 96, 32 * 37 + 5, seed=2)
    packed = int8_linear.pack_weight(q)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = int8_linear.linear(x, packed, q.shape[0], scale, bias)
        torch.set_num_threads(2)
        two = int8_linear.linear(x, packed, q.shape[0], scale, bias)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_odd_k_never_reads_past_the_row():
    # the padded pair's x is zero, never the next row's value or NaN (0 * NaN would poison the sum)
    x, q, scale, _ = _inputs(3, 9, 16, seed=3)
    wide = torch.full((3, 10), float("nan"), dtype=torch.bfloat16)
    wide[:, :9] = x
    got = int8_linear.linear(wide[:, :9], int8_linear.pack_weight(q), 16, scale, None)
    assert torch.isfinite(got).all()
    assert torch.equal(got, int8_linear.linear(x, int8_linear.pack_weight(q), 16, scale, None))


_HUGE_PAGES_CHILD = r"""
import json
import torch
from fovea.kernels import int8_linear
from fovea.layers.linear import Linear, prepare_linear_layer
from fovea.layers.quantization.int8 import Int8LinearMethod
from tests.memory_maps import advised_huge

q = torch.randint(-128, 128, (2048, 4096), dtype=torch.int8)  # 8 MiB of codes
# the ordinary pages first and every tensor kept: freed memory of an advised range may be handed out again
kept = {"small": int8_linear.pack_weight(q, huge_pages=False)}
for name, huge in (("encoder layer", False), ("layer", True)):
    layer = Linear(4096, 2048, bias=False, dtype=torch.bfloat16)
    layer.huge_pages = huge  # False: an encoder's layer (fovea.models.weights.encoder_layers_on_small_pages)
    layer.method = Int8LinearMethod()
    prepare_linear_layer(layer)
    kept[name] = layer.int8_packed
kept["w8a8 small"] = int8_linear.pack_weight_w8a8(q, huge_pages=False)[0]
kept["packed"] = int8_linear.pack_weight(q)
kept["w8a8"] = int8_linear.pack_weight_w8a8(q)[0]
print(json.dumps({name: advised_huge(t) for name, t in kept.items()}))
"""


def test_packed_weights_are_asked_onto_huge_pages():
    """Decode streams the packed codes; on 4 KiB pages the hardware prefetcher stops at every page. Layers that
    decode never reads (`huge_pages` False) keep ordinary pages. In a fresh process: in a long one, the allocator
    may hand out memory from a range an earlier allocation had advised."""
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _HUGE_PAGES_CHILD], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {"packed": True, "small": False, "layer": True, "encoder layer": False, "w8a8": True,
                    "w8a8 small": False}


def test_leading_dims_non_contiguous_input_and_no_rows():
    x, q, scale, bias = _inputs(12, 64, 40, seed=4)
    packed = int8_linear.pack_weight(q)
    flat = int8_linear.linear(x, packed, 40, scale, bias)
    assert torch.equal(int8_linear.linear(x.reshape(3, 4, 64), packed, 40, scale, bias), flat.reshape(3, 4, 40))
    wide = torch.zeros(12, 128, dtype=torch.bfloat16)
    wide[:, ::2] = x
    assert torch.equal(int8_linear.linear(wide[:, ::2], packed, 40, scale, bias), flat)
    assert int8_linear.linear(x[:0], packed, 40, scale, None).shape == (0, 40)


def test_bad_inputs_are_named():
    x, q, scale, bias = _inputs(4, 64, 40)
    packed = int8_linear.pack_weight(q)
    with pytest.raises(RuntimeError, match="x has K=32, the packed weight 64"):
        int8_linear.linear(x[:, :32], packed, 40, scale, None)
    with pytest.raises(RuntimeError, match=r"x must be a \[M, K\] bfloat16 tensor"):
        int8_linear.linear(x.float(), packed, 40, scale, None)
    with pytest.raises(RuntimeError, match="out_features=70 does not fit the packed weight's 2 panels"):
        int8_linear.linear(x, packed, 70, scale, None)
    with pytest.raises(RuntimeError, match=r"bias must be \[40\]"):
        int8_linear.linear(x, packed, 40, scale, bias[:8])
    with pytest.raises(RuntimeError, match=r"packed must be pack_weight's contiguous \[N / 32, K / 2, 64\] uint8"):
        int8_linear.linear(x, q, 40, scale, None)


def test_loaded_bfloat16_int8_layers_run_the_kernel_and_fall_back_when_it_is_off():
    torch.manual_seed(0)
    layer = Linear(99, 41, bias=True, dtype=torch.bfloat16)
    dense = layer.weight.detach().clone()
    layer.method = Int8LinearMethod()
    prepare_linear_layer(layer)
    assert hasattr(layer, "int8_packed") and not hasattr(layer, "int8_weight")  # one layout, no second copy
    assert "method=int8[fovea-avx512bf16]" in repr(layer)
    q, scale = quantize_weight_per_channel(dense, torch.bfloat16)
    assert torch.equal(int8_weight(layer), q)
    x = torch.randn(7, 99).bfloat16()
    with torch.inference_mode():
        got = layer(x)
        assert torch.equal(got, int8_linear.linear(x, layer.int8_packed, 41, scale, layer.bias))
        kernels.set_mode("off")  # the weight stays packed; the call unpacks and dequantizes
        fallback = layer(x)
    assert (got.float() - fallback.float()).abs().max() <= 0.02 * fallback.float().abs().max()
    assert torch.equal(layer.state_dict()["weight"], (q.bfloat16() * scale[:, None]))
    off = Linear(99, 41, dtype=torch.bfloat16)
    off.method = Int8LinearMethod()
    prepare_linear_layer(off)
    assert hasattr(off, "int8_weight") and not hasattr(off, "int8_packed")  # kernels off at load: [N, K]
    assert "method=int8[torch]" in repr(off)


# ---- W8A8: int8 activations x int8 weights, exact int32 sums (VNNI) ----------------------------------------------


def test_pack_weight_w8a8_layout_and_compensation():
    n, k = 41, 99  # K not a multiple of 4: padded with zeros
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    packed, compensation = int8_linear.pack_weight_w8a8(q)
    assert packed.shape == (2, 25, 32, 4) and packed.is_contiguous()
    for p, s, col, e in [(0, 0, 0, 0), (1, 4, 8, 3), (0, 24, 31, 2), (1, 20, 3, 1)]:
        assert packed[p, s, col, e] == q[32 * p + col, 4 * s + e]
    assert (packed[:, 24, :, 3] == 0).all()
    assert torch.equal(compensation, q.int().sum(dim=1) * 128) and compensation.dtype == torch.int32
    assert torch.equal(int8_linear.unpack_weight_w8a8(packed, n, k), q)


@pytest.mark.parametrize("rows", [1, 2, 6, 7, 13, 64, 70])
@pytest.mark.parametrize("k,n", [(97, 33), (130, 41), (64, 16), (201, 100)], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_equals_int_mm_and_the_same_float_ops_bit_for_bit(rows, k, n, dtype):
    from fovea.layers.quantization.int8 import int8_dynamic_linear, quantize_activation_per_token

    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    x = (torch.randn(rows, k, generator=g) * 3).to(dtype)
    x[0, :] = 0  # an all-zero row: scale eps, every q 0
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    q[0, :] = -128  # the largest magnitudes: |sum| up to K * 128 * 128
    scale = (torch.rand(n, generator=g) * 0.02 + 1e-3).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    packed, compensation = int8_linear.pack_weight_w8a8(q)
    qx, x_scale = quantize_activation_per_token(x)
    for b in (bias, None):
        got = int8_linear.dynamic_linear(qx, x_scale, packed, compensation, n, scale, b, dtype)
        assert got.dtype == dtype and got.shape == (rows, n)
        assert torch.equal(got, int8_dynamic_linear(x, q, scale, b))


@pytest.mark.parametrize("k", [64, 68, 72, 76, 75])
def test_w8a8_rows_alone_and_in_a_batch_over_every_tail(k):
    # each panel streamed in address order, 4 k quads a round and a tail of 0-3 (these K give each tail): every
    # row alone and in batches of 2-8 the same bits, equal to torch's _int_mm and the same float ops
    from fovea.layers.quantization.int8 import int8_dynamic_linear, quantize_activation_per_token

    g = torch.Generator().manual_seed(k)
    x = torch.randn(8, k, generator=g).bfloat16()
    q = torch.randint(-128, 128, (45, k), generator=g, dtype=torch.int8)
    scale, bias = (torch.rand(45, generator=g) * 0.02 + 1e-3).bfloat16(), torch.randn(45, generator=g).bfloat16()
    packed, compensation = int8_linear.pack_weight_w8a8(q)
    qx, x_scale = quantize_activation_per_token(x)
    alone = torch.cat([int8_linear.dynamic_linear(qx[i:i + 1], x_scale[i:i + 1], packed, compensation, 45, scale,
                                                  bias, torch.bfloat16) for i in range(8)])
    assert torch.equal(alone, int8_dynamic_linear(x, q, scale, bias))
    for rows in range(2, 9):
        got = int8_linear.dynamic_linear(qx[:rows], x_scale[:rows], packed, compensation, 45, scale, bias,
                                         torch.bfloat16)
        assert torch.equal(got, alone[:rows]), rows


def test_w8a8_bad_inputs_are_named():
    q = torch.randint(-128, 128, (40, 64), dtype=torch.int8)
    packed, compensation = int8_linear.pack_weight_w8a8(q)
    qx, x_scale = torch.zeros(3, 64, dtype=torch.int8), torch.ones(3)
    scale = torch.ones(40)
    with pytest.raises(RuntimeError, match="qx has K=60, the packed weight 64"):
        int8_linear.dynamic_linear(qx[:, :60], x_scale, packed, compensation, 40, scale, None, torch.float32)
    with pytest.raises(RuntimeError, match=r"qx must be a \[M, K\] int8 tensor"):
        int8_linear.dynamic_linear(qx.float(), x_scale, packed, compensation, 40, scale, None, torch.float32)
    with pytest.raises(RuntimeError, match="out_dtype must be float32 or bfloat16"):
        int8_linear.dynamic_linear(qx, x_scale, packed, compensation, 40, scale, None, torch.float16)
    with pytest.raises(RuntimeError, match="x_scale must have M=3 values"):
        int8_linear.dynamic_linear(qx, x_scale[:2], packed, compensation, 40, scale, None, torch.float32)
    with pytest.raises(RuntimeError, match=r"compensation must be a contiguous \[40\] int32"):
        int8_linear.dynamic_linear(qx, x_scale, packed, compensation.long(), 40, scale, None, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loaded_w8a8_layers_run_the_kernel_bit_for_bit(dtype):
    from fovea.layers.quantization.int8 import CompressedInt8LinearMethod, int8_dynamic_linear

    layer = Linear(99, 41, bias=True, dtype=dtype, method=CompressedInt8LinearMethod(False, True))
    q = torch.randint(-128, 128, (41, 99), dtype=torch.int8)
    with torch.no_grad():
        layer.weight.copy_(q)
        layer.weight_scale.copy_(torch.rand(41, 1) * 0.02 + 1e-3)
        layer.bias.copy_(torch.randn(41))
    layer.method.process_weights_after_loading(layer)
    assert hasattr(layer, "int8_packed") and not hasattr(layer, "int8_weight")
    assert torch.equal(int8_weight(layer), q) and torch.equal(layer.state_dict()["weight"], q)
    assert "method=int8-w8a8[fovea-vnni]" in repr(layer)
    x = (torch.randn(2, 5, 99) * 2).to(dtype)
    with torch.inference_mode():
        got = layer(x)
        assert torch.equal(got, int8_dynamic_linear(x, q, layer.int8_scale, layer.bias))
        kernels.set_mode("off")  # packed at load, kernels off later: unpacked for the call, same result
        assert torch.equal(layer(x), got)

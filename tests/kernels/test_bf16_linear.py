"""fovea's AVX-512 BF16 linear kernel: the padded panel layout, results against a float64 matmul of the same
bfloat16 inputs on odd shapes (K not a multiple of 32, N not a multiple of 16, 1 to 17 rows, bias or none), rows
independent of the batch around them, the same result on 1 and 2 threads, clear errors, and which loaded layers
run it. They run wherever the CPU has AVX-512 BF16 (AMD Zen 4, Intel Sapphire Rapids) and skip elsewhere."""
import pytest
import torch
from torch import nn

from fovea import kernels
from fovea.kernels import bf16_linear
from fovea.kernels.runtime import cpu_has_amx, cpu_has_bf16_linear_isa
from fovea.layers import linear_methods
from fovea.layers.linear import Linear, PackedLinear, prepare_linear_layer, prepare_linear_layers
from tests.kernels import linear_inputs as _inputs, requires_compiler

pytestmark = [requires_compiler, pytest.mark.skipif(not cpu_has_bf16_linear_isa(), reason="this CPU has no AVX-512 BF16")]


@pytest.fixture(autouse=True)
def _kernel_runs():
    assert bf16_linear.available(), kernels.status().summary()  # a build failure is not skipped


def _within_bound(got, x, w, bias):
    """float32 sums of exact bfloat16 products, rounded once to bfloat16: |got - exact| <= 2^-8 |exact| (one
    rounding, with room for the sum's own error moving the rounding point) + K 2^-23 sum_k |x_k w_k| (float32
    summation of K terms in any order). A wrong pairing, column or padding is off by O(1)."""
    xd, wd = x.double(), w.double()
    exact = xd @ wd.T + (0 if bias is None else bias.double())
    bound = exact.abs() * 2 ** -8 + (xd.abs() @ wd.abs().T) * x.shape[1] * 2 ** -23
    return ((got.double() - exact).abs() <= bound).all()


def test_pack_weight_pads_to_whole_panels_and_puts_each_element_where_the_kernel_reads_it():
    n, k = 40, 70  # padded to 64 x 96
    w = torch.arange(1, n * k + 1, dtype=torch.float32).reshape(n, k)
    packed = bf16_linear.pack_weight(w)
    assert packed.shape == (2, 3, 2, 16, 16, 2)
    for p, s, h, r, col, e in [(0, 0, 0, 0, 0, 0), (1, 0, 0, 3, 7, 1), (0, 2, 0, 2, 15, 1), (0, 1, 1, 15, 15, 0)]:
        assert packed[p, s, h, r, col, e] == w[32 * p + 16 * h + col, 32 * s + 2 * r + e]
    assert packed[1, 0, 0, 0, 8, 0] == 0  # row 40: past N
    assert packed[0, 2, 0, 3, 0, 0] == 0  # column 70: past K
    assert packed.count_nonzero() == n * k  # every element once, the rest padding
    assert torch.equal(bf16_linear.unpack_weight(packed, n, k), w)


@pytest.mark.parametrize("rows", range(1, 18))
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_a_float64_matmul_of_the_same_inputs_on_odd_shapes(rows, with_bias):
    for k, n in [(95, 70), (33, 17), (256, 48), (200, 1)]:  # K % 32 != 0, N % 16 != 0, whole steps, one column
        x, w, b = _inputs(rows, k, n, seed=rows)
        bias = b if with_bias else None
        got = bf16_linear.linear(x, bf16_linear.pack_weight(w), n, bias)
        assert got.shape == (rows, n) and got.dtype == torch.bfloat16
        assert _within_bound(got, x, w, bias), (k, n)


@pytest.mark.parametrize("rows", [24, 100, 300])
def test_prefill_sized_inputs(rows):
    # several row blocks of uneven size (100 = 9 blocks of 11-12), several panel groups per thread
    x, w, b = _inputs(rows, 1000, 333, seed=4)
    got = bf16_linear.linear(x, bf16_linear.pack_weight(w), 333, b)
    assert _within_bound(got, x, w, b)


def test_padding_never_reads_stray_bits():
    # x's columns past K are NaN in the buffer it is a view of: the kernel must read only K of them
    x, w, b = _inputs(5, 33, 20, seed=5)
    wide = torch.full((5, 64), float("nan"), dtype=torch.bfloat16)
    wide[:, :33] = x
    got = bf16_linear.linear(wide[:, :33], bf16_linear.pack_weight(w), 20, b)
    assert torch.isfinite(got.float()).all() and _within_bound(got, x, w, b)


def test_each_row_is_computed_alone():
    # any row block (1 to 12 rows, as 13+ rows are split) gives a row the same bits: batch-invariant decode. Blocks
    # of 1-4 rows run the loop that loads in address order, 5-12 the wide one: the same sums in the same order
    x, w, b = _inputs(40, 300, 100, seed=1)
    packed = bf16_linear.pack_weight(w)
    alone = torch.cat([bf16_linear.linear(x[i:i + 1], packed, 100, b) for i in range(40)])
    for rows in (2, 3, 4, 5, 8, 12, 13, 17, 40):
        assert torch.equal(bf16_linear.linear(x[:rows], packed, 100, b), alone[:rows]), rows


@pytest.mark.parametrize("rows", [1, 2, 4, 9, 600])
def test_two_threads_compute_every_panel_once(rows):
    x, w, b = _inputs(rows, 96, 32 * 70 - 5, seed=2)
    packed = bf16_linear.pack_weight(w)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = bf16_linear.linear(x, packed, w.shape[0], b)
        torch.set_num_threads(2)
        two = bf16_linear.linear(x, packed, w.shape[0], b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and _within_bound(two, x, w, b)


@pytest.mark.parametrize("rows", [1, 3, 4])
def test_decode_shapes_stream_many_panels(rows):
    # decode-sized layers (Qwen2-0.5B's o and down projections, K = 896 and 4864: 28 and 152 steps per panel,
    # 28-36 panels a thread) on 1 and 2 threads: every panel once, the same bits either way
    for n, k in [(896, 896), (896, 4864)]:
        x, w, b = _inputs(rows, k, n, seed=n + k + rows)
        packed = bf16_linear.pack_weight(w)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = bf16_linear.linear(x, packed, n, None)
            torch.set_num_threads(2)
            two = bf16_linear.linear(x, packed, n, None)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one, two) and _within_bound(two, x, w, None), (n, k)


def test_leading_dims_non_contiguous_input_and_no_rows():
    x, w, b = _inputs(12, 64, 40, seed=3)
    packed = bf16_linear.pack_weight(w)
    flat = bf16_linear.linear(x, packed, 40, b)
    assert torch.equal(bf16_linear.linear(x.reshape(3, 4, 64), packed, 40, b), flat.reshape(3, 4, 40))
    wide = torch.zeros(12, 128, dtype=torch.bfloat16)
    wide[:, ::2] = x
    assert torch.equal(bf16_linear.linear(wide[:, ::2], packed, 40, b), flat)
    assert bf16_linear.linear(x[:0], packed, 40, None).shape == (0, 40)


def test_bad_inputs_are_named():
    x, w, b = _inputs(4, 64, 40)
    packed = bf16_linear.pack_weight(w)
    ext = kernels.extension()
    with pytest.raises(RuntimeError, match="x has 16 columns; the packed weight takes 33 to 64"):
        ext.bf16_linear(x[:, :16], packed, 40, None)
    with pytest.raises(RuntimeError, match="out_features 70 does not fit the packed weight's 2 panels"):
        ext.bf16_linear(x, packed, 70, None)
    with pytest.raises(RuntimeError, match="bfloat16 \\[M, K\\] tensor"):
        ext.bf16_linear(x.float(), packed, 40, None)
    with pytest.raises(RuntimeError, match="bias must be a contiguous float32 \\[40\\]"):
        ext.bf16_linear(x, packed, 40, b.bfloat16())
    with pytest.raises(RuntimeError, match="pack_weight's"):
        ext.bf16_linear(x, w, 40, None)


@pytest.mark.skipif(cpu_has_amx(), reason="an AMX host runs its AMX kernel (or oneDNN) for these layers")
def test_loaded_bfloat16_layers_run_the_kernel_and_save_as_loaded(monkeypatch):
    monkeypatch.setattr(linear_methods, "IN_PLACE_LAYERS", "none")  # the packed panels, not the file's rows
    torch.manual_seed(0)
    model = nn.Sequential(Linear(64, 96, dtype=torch.bfloat16), Linear(96, 40, dtype=torch.bfloat16),
                          PackedLinear(40, {"gate_proj": 24, "up_proj": 24}, bias=False, dtype=torch.bfloat16),
                          Linear(48, 32, dtype=torch.float32))
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        expected = model[2](model[1](model[0](x)))
        assert prepare_linear_layers(model) == 4
        got = model[2](model[1](model[0](x)))
    assert [layer.method.name for layer in model] == ["avx512-bf16"] * 3 + ["onednn"]  # float32: oneDNN
    assert "method=avx512-bf16" in repr(model[0])
    assert not hasattr(model[0], "weight") or model[0].weight is None  # one copy: the packed panels
    assert (got.float() - expected.float()).abs().max() <= 0.02 * expected.float().abs().max()
    state = model.state_dict()
    assert state.keys() == dense.keys()
    assert all(torch.equal(state[k], v) and state[k].dtype == v.dtype for k, v in dense.items())
    kernels.set_mode("off")  # torch's own ops only: the layer stays dense
    off = Linear(64, 96, dtype=torch.bfloat16)
    assert not prepare_linear_layer(off) and off.method.name == "dense"


def test_packed_weights_are_asked_onto_huge_pages():
    # the 2 MiB pages inside a large tensor are advised (Linux decides whether it backs them); a tensor smaller
    # than one such page has none to advise
    ext = kernels.extension()
    assert ext.advise_huge_pages(torch.empty(8 << 20, dtype=torch.uint8))
    assert not ext.advise_huge_pages(torch.empty(1000, dtype=torch.uint8))
    w = torch.randn(1024, 2048).bfloat16()  # 4 MiB
    assert torch.equal(bf16_linear.unpack_weight(bf16_linear.pack_weight(w), 1024, 2048), w)

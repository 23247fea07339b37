"""fovea's row-major AVX-512 BF16 linear kernel (`fovea.kernels.rows_linear`): its fixed arithmetic bit for bit
against a float32 emulation, results against a float64 matmul within the panel kernel's own error, every row
bit-equal to that row alone (across the decode / GEMM switch and every tile edge), stacked sources with odd row
counts, row strides > K and column-range views, K and N tails, bias or none, 1 and 2 threads, a read-only file
mapping that ends right after the last row, and clear errors. They run where the CPU has AVX-512 BF16."""
import ctypes
import mmap
import os
import warnings

import pytest
import torch

from fovea import kernels
from fovea.kernels import bf16_linear, rows_linear
from fovea.kernels.runtime import cpu_has_bf16_linear_isa
from tests.kernels import linear_inputs as _inputs, requires_compiler

pytestmark = [requires_compiler, pytest.mark.skipif(not cpu_has_bf16_linear_isa(), reason="this CPU has no AVX-512 BF16")]

DECODE_ROWS = 8  # csrc/rows_linear.cpp kMaxDecodeRows: more rows of x run the GEMM path (4 x 6 tiles)
BLOCKED_X_BYTES = 16 << 10  # kBlockedXBytes: decode with rows x K x 2 above this runs the blocked path ...
BLOCKED_MIN_ROWS = 5  # kBlockedMinRows: ... from this many rows
CHUNK_BYTES = 16 << 10  # kChunkBytes: the blocked path's K chunks hold <= this many bytes of x (64 a row a step)


@pytest.fixture(autouse=True)
def _kernel_runs():
    assert rows_linear.available(), kernels.status().summary()  # a build failure is not skipped


def _threads(n):
    class Threads:
        def __enter__(self):
            self.before = torch.get_num_threads()
            torch.set_num_threads(n)

        def __exit__(self, *exc):
            torch.set_num_threads(self.before)
    return Threads()


def _emulate(x, w, bias):
    """The kernel's arithmetic in float32 torch ops: per output 16 lanes, each step lane l adds x[2l+1] w[2l+1]
    then x[2l] w[2l] (VDPBF16PS as the Intel SDM specifies it; bfloat16 products are exact in float32), steps in
    order, zeros past K, then the tree (l, l+8), (l, l+4), (l, l+2), (l, l+1), the bias, one rounding."""
    m, k = x.shape
    n, steps = w.shape[0], (k + 31) // 32
    xp = torch.zeros(m, steps * 32, dtype=torch.bfloat16)
    wp = torch.zeros(n, steps * 32, dtype=torch.bfloat16)
    xp[:, :k], wp[:, :k] = x, w
    xf, wf = xp.float().view(m, 1, steps, 16, 2), wp.float().view(1, n, steps, 16, 2)
    acc = torch.zeros(m, n, 16)
    for s in range(steps):
        products = xf[:, :, s] * wf[:, :, s]
        acc = acc + products[..., 1]
        acc = acc + products[..., 0]
    for half in (8, 4, 2, 1):
        acc = acc[..., :half] + acc[..., half:2 * half]
    y = acc[..., 0]
    return (y if bias is None else y + bias).bfloat16()


def _within_bound(got, x, w, bias):
    """The panel kernel's test bound (tests/kernels/test_bf16_linear.py): one bfloat16 rounding plus float32
    summation of K terms in any order. A wrong pairing, column, row or padding is off by O(1)."""
    xd, wd = x.double(), w.double()
    exact = xd @ wd.T + (0 if bias is None else bias.double())
    bound = exact.abs() * 2 ** -8 + (xd.abs() @ wd.abs().T) * x.shape[1] * 2 ** -23
    return ((got.double() - exact).abs() <= bound).all()


def _cancelling_inputs(rows, k, n, seed):
    """Inputs whose result depends on the order of the sums: in the first step, lane l (< 8) gets +2^(12+l) and
    lane l + 8 gets -2^(12+l) of every output, so the fixed tree cancels them in its first add and any other order
    carries large partial sums that round the small terms away differently (k >= 32)."""
    x, w, b = _inputs(rows, k, n, seed)
    for lane in range(8):
        x[:, 2 * lane] = x[:, 2 * lane + 16] = 2.0 ** (12 + lane)
        w[:, 2 * lane], w[:, 2 * lane + 16] = 1, -1
    return x, w, b


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 23])
def test_the_fixed_arithmetic_bit_for_bit(rows):
    # decode (1-8 rows) and GEMM (9+) paths, K with a tail step, N with a partial group of 16
    for k, n in [(100, 40), (333, 21), (64, 17)]:
        x, w, b = _cancelling_inputs(rows, k, n, seed=rows + k)
        for bias in (b, None):
            assert torch.equal(rows_linear.linear(x, [w], n, bias), _emulate(x, w, bias)), (k, n)


def test_a_wrong_order_would_be_caught():
    # the check above discriminates: on these inputs, lanes summed in order, adjacent lanes paired first, or each
    # VDPBF16PS pair added even element first give other bits in most outputs
    x, w, _ = _cancelling_inputs(9, 333, 64, seed=1)
    got = rows_linear.linear(x, [w], 64, None)
    xp = torch.zeros(9, 352, dtype=torch.bfloat16)
    wp = torch.zeros(64, 352, dtype=torch.bfloat16)
    xp[:, :333], wp[:, :333] = x, w
    products = xp.float().view(9, 1, 11, 16, 2) * wp.float().view(1, 64, 11, 16, 2)
    acc = torch.zeros(9, 64, 16)
    even_first = torch.zeros(9, 64, 16)
    for s in range(11):
        acc = acc + products[:, :, s, :, 1] + products[:, :, s, :, 0]
        even_first = even_first + products[:, :, s, :, 0] + products[:, :, s, :, 1]
    in_order = acc[..., 0]
    for lane in range(1, 16):
        in_order = in_order + acc[..., lane]
    adjacent = acc
    while adjacent.shape[-1] > 1:
        adjacent = adjacent[..., 0::2] + adjacent[..., 1::2]
    for half in (8, 4, 2, 1):
        even_first = even_first[..., :half] + even_first[..., half:2 * half]
    for wrong in (in_order, adjacent[..., 0], even_first[..., 0]):
        assert (got != wrong.bfloat16()).sum() > got.numel() // 2


@pytest.mark.parametrize("rows", [1, 2, 4, 7, 8, 9, 16, 57])
@pytest.mark.parametrize("with_bias", [True, False])
def test_within_the_panel_kernels_error_on_odd_shapes(rows, with_bias):
    for k, n in [(95, 70), (33, 17), (256, 48), (200, 1), (1, 5), (2, 33), (31, 16), (1001, 130)]:
        x, w, b = _inputs(rows, k, n, seed=rows * 7 + k)
        bias = b if with_bias else None
        got = rows_linear.linear(x, [w], n, bias)
        assert got.shape == (rows, n) and got.dtype == torch.bfloat16
        assert _within_bound(got, x, w, bias), (k, n)
        panel = bf16_linear.linear(x, bf16_linear.pack_weight(w), n, bias)
        exact = x.double() @ w.double().T + (0 if bias is None else bias.double())
        ours, theirs = (got.double() - exact).abs().mean(), (panel.double() - exact).abs().mean()
        assert ours <= 1.25 * theirs + 1e-6, (k, n, ours, theirs)  # both are one bfloat16 rounding away


def test_each_row_is_computed_alone():
    # a row gets the same bits in any batch: M = 1..40 cross the decode -> GEMM switch (8 -> 9) and every tile edge
    # (4 rows of x per tile); bigger M run many tiles and several blocks of W
    x, w, b = _inputs(300, 291, 203, seed=2)  # K: 9 whole steps and a tail; N: 33 tiles of 6 plus 5
    alone = torch.cat([rows_linear.linear(x[i:i + 1], [w], 203, b) for i in range(300)])
    for rows in [*range(2, 41), 64, 131, 257, 300]:
        assert torch.equal(rows_linear.linear(x[:rows], [w], 203, b), alone[:rows]), rows
    assert torch.equal(rows_linear.linear(x[37:300], [w], 203, b), alone[37:])  # rows not at the buffer's start


def _blocked_ks(rows):
    """K values around the blocked decode's switches at this many rows: the last K of the stream path, the first
    of the blocked one (two chunks, the second one step shorter or a tail), two whole chunks exactly, and three
    chunks with a tail step of one element."""
    first = BLOCKED_X_BYTES // (2 * rows) + 1
    chunk = CHUNK_BYTES // (64 * rows) * 32  # elements of K per chunk
    return [first - 1, first, 2 * chunk, 2 * chunk + 1]


@pytest.mark.parametrize("rows", range(BLOCKED_MIN_ROWS - 1, DECODE_ROWS + 1))  # 4: the streams at those K
def test_the_blocked_decode_bit_for_bit_at_its_switches(rows):
    # the fixed arithmetic across K chunks (accumulators stored and reloaded between them), tiles of
    # csrc blocked_cols(rows) W rows and single-row tiles at two sources' ends, 1 and 2 threads
    for k in _blocked_ks(rows):
        x, w, b = _cancelling_inputs(rows, k, 37, seed=rows + k)
        want = _emulate(x, w, b)
        for threads in (1, 2):
            with _threads(threads):
                assert torch.equal(rows_linear.linear(x, [w[:20], w[20:]], 37, b), want), (k, threads)


def test_each_row_is_computed_alone_across_the_blocked_switch():
    # K = 2500: 1-4 rows run the streams, 5-8 the blocked path (x > 16 KB: 2-3 K chunks), 9+ the GEMM
    x, w, b = _inputs(12, 2500, 203, seed=12)
    alone = torch.cat([rows_linear.linear(x[i:i + 1], [w], 203, b) for i in range(12)])
    for rows in range(2, 13):
        assert torch.equal(rows_linear.linear(x[:rows], [w], 203, b), alone[:rows]), rows
    assert torch.equal(rows_linear.linear(x[3:11], [w], 203, b), alone[3:11])  # x's rows not at its start


BIG_X_BYTES = 8 << 20  # csrc kBigXBytes: a GEMM whose x is bigger takes 1.5 MB blocks of W instead of 256 KB


def test_each_row_is_computed_alone_across_the_big_x_switch():
    # K = 4096: 1024 rows of x are 8 MB (256 KB blocks of W: 30 rows), 1025 rows past it (1.5 MB blocks, capped at
    # 2 per thread: 48 rows at 2 threads, 96 at 1; N = 203 ends in a partial block and a partial tile either way)
    k = 4096
    rows = BIG_X_BYTES // (2 * k)
    x, w, b = _inputs(rows + 1, k, 203, seed=13)
    alone = torch.cat([rows_linear.linear(x[i:i + 1], [w], 203, b) for i in range(rows + 1)])
    for m in (rows, rows + 1):
        assert torch.equal(rows_linear.linear(x[:m], [w], 203, b), alone[:m]), m
    with _threads(1):
        assert torch.equal(rows_linear.linear(x, [w], 203, b), alone)


def test_sources_stack_along_n_whatever_their_strides():
    k = 77
    x, w, b = _inputs(12, k, 7 + 13 + 29, seed=3)
    wide = torch.zeros(100, 3 * k, dtype=torch.bfloat16)  # a bigger matrix: sources are views into it
    wide[:7, :k] = w[:7]                 # rows 0-6: row stride 3K
    wide[10:23, 5:5 + k] = w[7:20]       # a column range starting at an odd element (2-byte aligned rows)
    pieces = [wide[:7, :k], wide[10:23, 5:5 + k], w[20:].clone()]
    assert pieces[0].stride(0) == 3 * k and pieces[1].storage_offset() % 2 == 1
    for rows in (1, 5, 8, 9, 12):
        whole = rows_linear.linear(x[:rows], [w], 49, b)
        assert torch.equal(rows_linear.linear(x[:rows], pieces, 49, b), whole), rows
        assert _within_bound(whole, x[:rows], w, b)


def test_a_row_stride_larger_than_k_in_x_and_leading_dims():
    x, w, b = _inputs(12, 64, 40, seed=4)
    flat = rows_linear.linear(x, [w], 40, b)
    assert torch.equal(rows_linear.linear(x.reshape(3, 4, 64), [w], 40, b), flat.reshape(3, 4, 40))
    wide = torch.full((12, 100), float("nan"), dtype=torch.bfloat16)  # x's row stride > K, NaN past its K columns
    wide[:, 3:67] = x
    assert torch.equal(rows_linear.linear(wide[:, 3:67], [w], 40, b), flat)
    strided = torch.zeros(12, 128, dtype=torch.bfloat16)
    strided[:, ::2] = x  # stride(1) == 2: copied once by the wrapper
    assert torch.equal(rows_linear.linear(strided[:, ::2], [w], 40, b), flat)
    assert rows_linear.linear(x[:0], [w], 40, None).shape == (0, 40)


@pytest.mark.parametrize("rows", [1, 2, 4, 8, 9, 40, 600])
def test_two_threads_give_the_bits_of_one(rows):
    x, w, b = _inputs(rows, 96, 32 * 70 - 5, seed=5)
    pieces = [w[:1000], w[1000:1001], w[1001:]]
    with _threads(1):
        one = rows_linear.linear(x, pieces, w.shape[0], b)
    with _threads(2):
        two = rows_linear.linear(x, pieces, w.shape[0], b)
    assert torch.equal(one, two) and _within_bound(two, x, w, b)


@pytest.mark.parametrize("rows", [1, 4, 16])
def test_decode_shapes_on_one_and_two_threads(rows):
    # Qwen2-0.5B's q, k/v, gate+up (two sources) and down projections: many items per thread, tails of 16-row groups
    for sizes, k in [((896,), 896), ((128,), 896), ((4864, 4864), 896), ((896,), 4864)]:
        x, w, _ = _inputs(rows, k, sum(sizes), seed=k + rows)
        pieces = list(w.split(sizes))
        with _threads(1):
            one = rows_linear.linear(x, pieces, w.shape[0], None)
        with _threads(2):
            two = rows_linear.linear(x, pieces, w.shape[0], None)
        assert torch.equal(one, two) and _within_bound(two, x, w, None), (sizes, k)


# Linux x86-64 mmap constants (Python's mmap module has no PROT_NONE or MAP_FIXED)
PROT_NONE, MAP_FIXED, MAP_ANONYMOUS = 0, 0x10, 0x20


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="maps the file with Linux's mmap flags")
@pytest.mark.parametrize("k", [37, 1061])  # 1061: 8 rows run the blocked decode (x > 16 KB)
def test_reads_a_read_only_file_mapping_and_nothing_past_its_end(tmp_path, k):
    # W ends exactly where the read-only file mapping ends, and the page after it is mapped inaccessible: a load
    # past the last row's K (a tail step read whole) would fault, a write anywhere would too
    rows, page = 40, mmap.PAGESIZE  # K % 32 = 5: the last row's tail step ends 54 bytes before the guard
    x, w, b = _inputs(11, k, rows, seed=6)
    num_bytes = -(-rows * k * 2 // page) * page
    raw = torch.zeros(num_bytes // 2, dtype=torch.bfloat16)
    raw[-rows * k:] = w.flatten()
    path = tmp_path / "w.bin"
    raw.view(torch.uint8).numpy().tofile(path)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    reserved = libc.mmap(None, num_bytes + page, PROT_NONE, mmap.MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    assert reserved not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    fd = os.open(path, os.O_RDONLY)
    try:
        assert libc.mmap(reserved, num_bytes, mmap.PROT_READ, mmap.MAP_SHARED | MAP_FIXED, fd, 0) == reserved
        buffer = (ctypes.c_uint8 * num_bytes).from_address(reserved)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "not writable" (once per process): read-only is the point
            mapped = torch.frombuffer(memoryview(buffer).toreadonly(), dtype=torch.bfloat16)
        view = mapped[-rows * k:].view(rows, k)
        assert torch.equal(view, w)
        for m in (1, 3, 8, 9, 11):
            assert torch.equal(rows_linear.linear(x[:m], [view[:17], view[17:]], rows, b),
                               rows_linear.linear(x[:m], [w], rows, b)), m
    finally:
        os.close(fd)
        libc.munmap(reserved, num_bytes + page)


def test_supports():
    w = torch.zeros(8, 16, dtype=torch.bfloat16)
    assert rows_linear.supports(w) and rows_linear.supports(torch.zeros(8, 40, dtype=torch.bfloat16)[:, 3:19])
    assert not rows_linear.supports(w.float()) and not rows_linear.supports(w[:, ::2])
    assert not rows_linear.supports(w[:0]) and not rows_linear.supports(w.flatten())
    kernels.set_mode("off")
    assert not rows_linear.available() and not rows_linear.supports(w)
    with pytest.raises(RuntimeError, match=r"does not run here \(off \(cpu_kernels=off\)\)"):
        rows_linear.linear(torch.zeros(1, 16, dtype=torch.bfloat16), [w], 8, None)


def test_bad_inputs_are_named():
    x, w, b = _inputs(4, 64, 40)
    ext = kernels.extension()
    with pytest.raises(RuntimeError, match="x must be a CPU bfloat16 \\[M, K\\] tensor"):
        ext.rows_linear(x.float(), [w], 40, None)
    with pytest.raises(RuntimeError, match="x must be a CPU bfloat16 \\[M, K\\] tensor with contiguous rows"):
        ext.rows_linear(x.t(), [w], 40, None)
    with pytest.raises(RuntimeError, match="sources is empty"):
        ext.rows_linear(x, [], 40, None)
    with pytest.raises(RuntimeError, match="sources\\[1\\] must be a CPU bfloat16 \\[n, K\\] tensor"):
        ext.rows_linear(x, [w[:20], w[20:].float()], 40, None)
    with pytest.raises(RuntimeError, match="sources\\[0\\] must be a CPU bfloat16 \\[n, K\\] tensor"):
        ext.rows_linear(x, [w.flatten()], 40, None)
    with pytest.raises(RuntimeError, match="sources\\[0\\] has 32 columns; x has K = 64"):
        ext.rows_linear(x, [w[:, :32]], 40, None)
    with pytest.raises(RuntimeError, match="sources\\[0\\] must have contiguous rows .*stride\\(0\\) >= K"):
        ext.rows_linear(x, [torch.zeros(64, 40, dtype=torch.bfloat16).t()], 40, None)
    with pytest.raises(RuntimeError, match="stride\\(0\\) >= K"):
        ext.rows_linear(x, [torch.zeros(2000, dtype=torch.bfloat16).as_strided((40, 64), (32, 1))], 40, None)
    with pytest.raises(RuntimeError, match="the sources have 40 rows in all; out_features is 41"):
        ext.rows_linear(x, [w[:10], w[10:]], 41, None)
    with pytest.raises(RuntimeError, match="bias must be a contiguous CPU float32 \\[40\\] tensor or None"):
        ext.rows_linear(x, [w], 40, b.bfloat16())
    with pytest.raises(RuntimeError, match="bias must be a contiguous CPU float32 \\[40\\]"):
        ext.rows_linear(x, [w], 40, b[:20])
    with pytest.raises(RuntimeError, match="no columns"):
        ext.rows_linear(x[:, :0], [w[:, :0]], 40, None)
    with pytest.raises(TypeError, match="sources must be a sequence"):
        rows_linear.linear(x, w, 40, None)

"""The extension's panel packing (`csrc/weight_pack.cpp`, used by `panels.pack_weight` at load) against the
layout's definition by torch's ops (`reference_pack`), bit for bit: odd N and K (padding), rows at any stride and
at a 2-byte offset (a tensor in a memory-mapped checkpoint), float16, 1 and 2 threads, a checkpoint's read-only
pages, and the errors that name a wrong destination or weight. Plain C++: runs wherever the extension builds."""
import pytest
import torch

from fovea import kernels
from fovea.kernels import panels
from fovea.models.safetensors_mmap import SafetensorsFile
from tests.kernels import requires_compiler

pytestmark = requires_compiler


@pytest.fixture(autouse=True)
def _extension_built():
    assert kernels.extension() is not None, kernels.status().summary()  # a build failure is not skipped


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)  # compares NaN payloads and signed zeros too


def _random_bits(n: int, k: int, seed: int = 0) -> torch.Tensor:
    # every 16-bit pattern may occur (NaNs, infinities, denormals): a copy must move bits, not values
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(1 << 15), 1 << 15, (n, k), dtype=torch.int16, generator=g).view(torch.bfloat16)


@pytest.mark.parametrize("n, k", [(1, 1), (1, 2), (16, 31), (32, 32), (33, 65), (40, 70), (95, 2047),
                                  (257, 96), (2560, 1024)])
def test_extension_pack_equals_the_reference_pack(n, k):
    w = _random_bits(n, k)
    got = panels.pack_weight(w)
    want = panels.reference_pack(w)
    assert got.shape == want.shape == (panels.padded(n) // 32, panels.padded(k) // 32, 2, 16, 16, 2)
    assert torch.equal(_bits(got), _bits(want))


def test_rows_at_a_stride_and_at_an_odd_address_and_float16():
    base = _random_bits(64, 300, seed=1)
    for w in (base[:, 7:207], base[3:50, 1:100], base.view(-1)[1:1 + 40 * 70].view(40, 70)):
        assert w.data_ptr() % 4 == 2 or w.stride(0) != w.shape[1]  # not a plain aligned matrix
        assert torch.equal(_bits(panels.pack_weight(w)), _bits(panels.reference_pack(w)))
    half = base.view(torch.float16)[:, :99]
    assert panels.pack_weight(half).dtype == torch.float16
    assert torch.equal(_bits(panels.pack_weight(half)), _bits(panels.reference_pack(half)))


def test_one_and_two_threads_give_the_same_bits():
    w = _random_bits(32 * 37 - 3, 333, seed=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = panels.pack_weight(w)
        torch.set_num_threads(2)
        two = panels.pack_weight(w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(_bits(one), _bits(two)) and torch.equal(_bits(two), _bits(panels.reference_pack(w)))


def test_packs_straight_from_a_checkpoints_read_only_pages(tmp_path):
    from safetensors.torch import save_file

    tensors = {"odd": _random_bits(1, 3, seed=3), "w": _random_bits(48, 77, seed=4)}
    save_file(tensors, tmp_path / "m.safetensors")
    with SafetensorsFile(tmp_path / "m.safetensors") as f:
        mapped = f.get("w")
        assert f.holds(mapped) and mapped.data_ptr() % 4 == 2  # after "odd"'s 6 bytes: pairs straddle words
        got = panels.pack_weight(mapped)
        del mapped
    assert torch.equal(_bits(got), _bits(panels.reference_pack(tensors["w"])))


def test_a_wrong_destination_or_weight_is_named():
    ext = kernels.extension()
    w = _random_bits(40, 70)
    with pytest.raises(RuntimeError, match=r"packed must be a contiguous \[2, 3, 2, 16, 16, 2\] tensor"):
        ext.pack_panels_(torch.empty(2, 2, 2, 16, 16, 2, dtype=torch.bfloat16), w)
    with pytest.raises(RuntimeError, match="of the weight's dtype"):
        ext.pack_panels_(torch.empty(2, 3, 2, 16, 16, 2, dtype=torch.float16), w)
    with pytest.raises(RuntimeError, match=r"2-byte \[N, K\] matrix with contiguous rows"):
        ext.pack_panels_(torch.empty(2, 3, 2, 16, 16, 2), w.float())
    with pytest.raises(RuntimeError, match=r"2-byte \[N, K\] matrix with contiguous rows"):
        ext.pack_panels_(torch.empty(3, 2, 2, 16, 16, 2, dtype=torch.bfloat16), w.t())


def test_projections_packed_into_their_panels_are_the_stacked_weights_packing():
    # q, k, v of 64, 32 and 40 rows (each but the last a whole number of panels) packed one by one into the runs
    # of panels their rows take in the stacked weight: the stacked weight's packing, padding included
    q, k, v = _random_bits(64, 70, seed=5), _random_bits(32, 70, seed=6), _random_bits(40, 70, seed=7)
    packed = panels.empty_packed(136, 70, torch.bfloat16)
    for first, w in ((0, q), (2, k), (3, v)):
        assert panels.pack_weight(w, out=packed[first:first + panels.padded(w.shape[0]) // 32]).data_ptr() \
            == packed[first].data_ptr()
    assert torch.equal(_bits(packed), _bits(panels.reference_pack(torch.cat([q, k, v]))))
    with pytest.raises(ValueError, match=r"packed panels \[1, 3, 2, 16, 16, 2\] .* do not fit a \[40, 70\] weight"):
        panels.pack_weight(v, out=packed[:1])

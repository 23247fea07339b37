"""fovea.kernels.memory_read.read_bytes, the streaming read the decode bound is measured with: it reads every byte
of the tensor once (its byte sum equals torch's) whatever the size, the start's alignment, the work item size,
the number of interleaved streams, prefetch on or off, and on 1 or 2 threads; and it refuses what it cannot read."""
import pytest
import torch

from fovea.kernels.memory_read import read_bytes
from tests.kernels import requires_compiler

pytestmark = requires_compiler


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _bytes(n, seed=0):
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("size", [0, 1, 63, 64, 2047, 2048, 2049, 4096 + 65, (3 << 20) + 777])
def test_every_byte_is_read_once(threads, num_threads, prefetch, size):
    threads(num_threads)
    data = _bytes(size + 64, seed=size)
    for offset in (0, 1, 17):  # the tensor starts off a 64-byte line: a head and a tail around the vector loop
        t = data[offset:offset + size]
        assert read_bytes(t, prefetch=prefetch) == int(t.long().sum())


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("streams", [2, 3, 4, 8])
@pytest.mark.parametrize("size", [1, 2047, 2048 * 3 + 5, 2048 * 8, 2048 * 17 + 64 * 5 + 9, (3 << 20) + 777])
def test_interleaved_streams_read_every_byte_once(threads, num_threads, prefetch, streams, size):
    # sizes below, at and above `streams` whole 2 KB pieces: the sub-ranges, the pieces past them, the lines
    # and the bytes past those; 3 streams do not divide an item evenly
    threads(num_threads)
    data = _bytes(size + 64, seed=size + streams)
    for offset in (0, 5):
        t = data[offset:offset + size]
        assert read_bytes(t, prefetch=prefetch, streams=streams) == int(t.long().sum())
    # one byte changed anywhere changes the sum by exactly its difference: no byte is read twice or skipped
    t = data[:size].clone()
    for index in (0, size // 3, size - 1):
        before = read_bytes(t, streams=streams)
        t[index] = (int(t[index]) + 1) % 256
        assert read_bytes(t, streams=streams) - before == (1 if int(t[index]) != 0 else -255)


def test_streams_with_small_items(threads):
    # 2 KB items hold one piece each: no sub-range is a whole piece, so every stream count reads them in order
    threads(2)
    t = _bytes(2048 * 301 + 77, seed=3)
    for streams in (1, 2, 8):
        assert read_bytes(t, chunk_bytes=2048, streams=streams) == int(t.long().sum())
        assert read_bytes(t, chunk_bytes=8192, streams=streams) == int(t.long().sum())


def test_small_work_items_split_and_stolen(threads):
    # 1000 items of 2 KB over 2 threads (each takes from the back of the other's run once its own is done)
    threads(2)
    t = _bytes(2048 * 1000 + 5)
    assert read_bytes(t, chunk_bytes=2048) == int(t.long().sum())


def test_any_dtype_is_read_as_its_bytes():
    t = torch.arange(1000, dtype=torch.bfloat16)
    assert read_bytes(t) == int(t.view(torch.uint8).long().sum())


def test_refusals_name_the_problem():
    with pytest.raises(RuntimeError, match="contiguous"):
        read_bytes(torch.zeros(10, 10)[:, ::2])
    with pytest.raises(RuntimeError, match="multiple of 2048"):
        read_bytes(torch.zeros(10), chunk_bytes=1000)
    with pytest.raises(RuntimeError, match="streams must be 1 to 64, got 0"):
        read_bytes(torch.zeros(10), streams=0)
    with pytest.raises(RuntimeError, match="streams must be 1 to 64, got 65"):
        read_bytes(torch.zeros(10), streams=65)

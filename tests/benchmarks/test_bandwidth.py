"""benchmarks/bandwidth.py, the memory-read bound of single-stream decode: the bound's arithmetic on hand-made
samples (its reader's fastest read, medians, drift), the buffer really on 2 MiB pages where Linux offers them, and
a real measurement that reads the whole buffer with every reader."""
import math
from pathlib import Path

import pytest
import torch

from benchmarks.bandwidth import ReadBound, ReadSample, huge_page_buffer, huge_page_bytes, measure
from tests.kernels import requires_compiler

GB = 10**9


def _sample(reader, when, gbs):
    return ReadSample(reader, when, GB, 1 / gbs)  # 1 GB in 1/gbs seconds


def test_the_bound_is_the_fastest_read_of_any_reader_before_or_after():
    bound = ReadBound([_sample("stream", "before", g) for g in (30, 40, 35)]
                      + [_sample("stream", "after", g) for g in (20, 42, 22, 21)]
                      + [_sample("sum", "before", 39), _sample("stream-nopf", "after", 41)])
    assert (bound.bound_reader, bound.bound_gbs) == ("stream", pytest.approx(42))
    assert bound.median("stream", "before") == pytest.approx(35)
    assert bound.median("stream", "after") == pytest.approx(21.5)
    assert bound.median("stream") == pytest.approx(30)  # 20 21 22 30 35 40 42
    assert bound.best("stream", "before") == pytest.approx(40)
    assert bound.drift("stream") == pytest.approx(21.5 / 35)
    assert math.isnan(bound.drift("sum"))  # measured before only
    lines = bound.describe(GB)
    assert [line.split()[0] for line in lines] == ["stream", "stream-nopf", "sum"]
    assert "the bound" in lines[0] and "drift -38.6%" in lines[0] and "the bound" not in lines[2]
    # a faster sum sets it instead
    bound.samples.append(_sample("sum", "after", 44))
    assert (bound.bound_reader, bound.bound_gbs) == ("sum", pytest.approx(44))
    assert "the bound" in bound.describe(GB)[2] and "the bound" not in bound.describe(GB)[0]


def _thp_mode():
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not path.exists():
        return None
    return path.read_text().split("[")[1].split("]")[0]


@requires_compiler
@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="Linux offers no transparent huge pages here")
def test_the_buffer_lies_on_2_mib_pages():
    buffer = huge_page_buffer(64 << 20)
    assert buffer.dtype == torch.uint8 and buffer.nbytes == 64 << 20 and bool((buffer == 1).all())
    # the advice covers the whole 2 MiB pages inside the buffer: all but at most the two partial ends
    assert huge_page_bytes(buffer) >= (64 << 20) - (4 << 20)
    if _thp_mode() == "madvise":  # without the advice, 4 KiB pages
        assert huge_page_bytes(huge_page_buffer(64 << 20, huge_pages=False)) == 0


@requires_compiler
def test_a_measurement_reads_every_reader_interleaved():
    samples = measure(huge_page_buffer(8 << 20), "before", repeats=2)
    assert [s.reader for s in samples] == ["stream", "stream-nopf", "sum"] * 2
    assert all(s.when == "before" and s.num_bytes == 8 << 20 and s.seconds > 0 for s in samples)

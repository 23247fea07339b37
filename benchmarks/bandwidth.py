"""The memory-read bound of single-stream decode, measured the way a decode step reads its weights (issue 16).

A decode step streams every packed weight once (~1 GB for the Qwen benchmark LM), from 2 MiB pages, each of the
threads one contiguous run of it with a software prefetch ahead (`RangeSplit` and `kWeightPrefetchBytes` in
fovea/kernels/csrc/common.h). The bound is measured on a buffer of that size, on such pages (`huge_page_buffer`
checks how much of it Linux really put on them), by three readers, several repetitions each, interleaved so that
a neighbour's burst slows all of them alike, and taken again after the runs it is compared with, so drift shows:

- `stream`: `fovea.kernels.memory_read.read_bytes`, AVX-512 loads with the kernels' split and software prefetch
  and no arithmetic to speak of: the rate at which the kernels could read;
- `stream-nopf`: the same without the software prefetch (the hardware prefetcher alone), which on a plain read
  loop was the faster of the two on the AMD EPYC;
- `sum`: `torch.sum` over the buffer as bfloat16, the figure earlier READMEs used (its own loop converts and adds
  every element, and torch splits the work its own way).

THE BOUND is the fastest single read of any reader, before or after (`ReadBound.bound_gbs`). Why the fastest: a
1 GB read is 32x the last-level cache, so nothing makes one faster than the memory system allows, while any
neighbour on the host slows it; the fastest repetition is the closest estimate of the limit, and it is the
statistic the decode figures themselves use (best of their repetitions). Why any reader: each is a real way to
read those bytes, so the machine reads at least that fast; which of them wins depends on the host (and a bound
that one slow loop set would flatter the kernels). The medians are printed beside it for the spread, before and
after for drift.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

READERS = ("stream", "stream-nopf", "sum")
HUGE_PAGE = 1 << 21


@dataclass(slots=True, frozen=True)
class ReadSample:
    reader: str  # one of READERS
    when: str  # "before" / "after" the runs the bound is compared with
    num_bytes: int
    seconds: float

    @property
    def gbs(self) -> float:
        return self.num_bytes / self.seconds / 1e9


@dataclass(slots=True)
class ReadBound:
    """Every timed read of one benchmark run; the bound and its spread."""

    samples: list[ReadSample] = field(default_factory=list)

    def rates(self, reader: str, when: str | None = None) -> list[float]:
        return [s.gbs for s in self.samples if s.reader == reader and (when is None or s.when == when)]

    def median(self, reader: str, when: str | None = None) -> float:
        rates = self.rates(reader, when)
        return statistics.median(rates) if rates else float("nan")

    def best(self, reader: str, when: str | None = None) -> float:
        return max(self.rates(reader, when), default=float("nan"))

    @property
    def bound_reader(self) -> str:
        """The reader of the fastest read (the bound's)."""
        return max(self.samples, key=lambda sample: sample.gbs).reader

    @property
    def bound_gbs(self) -> float:
        """THE bound: the fastest read of any reader, before or after (the module docstring says why)."""
        return max(sample.gbs for sample in self.samples)

    def drift(self, reader: str) -> float:
        """Median after / median before (nan until both were measured): how far the machine moved meanwhile."""
        return self.median(reader, "after") / self.median(reader, "before")

    def describe(self, num_bytes: int) -> list[str]:
        """One line per reader: median and max GB/s before and after, and the drift."""
        lines = []
        for reader in READERS:
            if not self.rates(reader):
                continue
            parts = []
            for when in ("before", "after"):
                if self.rates(reader, when):
                    parts.append(f"{when} median {self.median(reader, when):5.1f} max {self.best(reader, when):5.1f}")
            drift = self.drift(reader)
            tail = f", drift {drift - 1:+.1%}" if drift == drift else ""
            mark = "   <- the bound (its max)" if reader == self.bound_reader else ""
            lines.append(f"    {reader:12s} {', '.join(parts)} GB/s over {num_bytes / 1e9:.2f} GB{tail}{mark}")
        return lines


def huge_page_buffer(num_bytes: int, huge_pages: bool = True) -> torch.Tensor:
    """A uint8 buffer, advised onto 2 MiB pages before anything touches it (as `fovea.kernels.panels.pack_weight`
    does for the packed weights), then written so every page is faulted in."""
    buffer = torch.empty(num_bytes, dtype=torch.uint8)
    if huge_pages:
        from fovea.kernels.ops import extension

        module = extension()
        if module is not None:
            module.advise_huge_pages(buffer)
    buffer.fill_(1)
    return buffer


def huge_page_bytes(t: torch.Tensor) -> int:
    """Bytes of `t`'s memory that Linux backs with transparent huge pages: the `AnonHugePages` of the mappings
    that overlap it in /proc/self/smaps (a mapping only partly inside `t` counts whole, up to t's size)."""
    start = t.data_ptr()
    end = start + t.nbytes
    total = 0
    overlaps = False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(v, 16) for v in head.split("-"))
                    overlaps = lo < end and hi > start
                elif overlaps and head == "AnonHugePages:":
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return min(total, t.nbytes)


def time_reader(reader: str, buffer: torch.Tensor) -> float:
    """Seconds for one read of the whole buffer by `reader`."""
    from fovea.kernels.memory_read import read_bytes

    start = time.perf_counter()
    if reader == "sum":
        buffer.view(torch.bfloat16).sum()
    else:
        read_bytes(buffer, prefetch=reader == "stream")
    return time.perf_counter() - start


def measure(buffer: torch.Tensor, when: str, repeats: int, readers: tuple[str, ...] = READERS) -> list[ReadSample]:
    """`repeats` timed reads of the buffer by each reader, interleaved, on torch's current thread count (one
    untimed read each first: the loops' code and the first touch)."""
    from fovea.kernels.ops import extension

    if extension() is None:
        readers = tuple(r for r in readers if r == "sum")
    for reader in readers:
        time_reader(reader, buffer)
    samples = []
    for _ in range(repeats):
        for reader in readers:
            samples.append(ReadSample(reader, when, buffer.nbytes, time_reader(reader, buffer)))
    return samples

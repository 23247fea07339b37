"""How one core reads memory fastest: fovea's streaming reader with 1, 2, 4 or 8 interleaved streams per work
item, with and without the kernels' software prefetch, against `torch.sum`, interleaved in one run (issue 16).

The question behind it: `torch.sum` over a bfloat16 buffer read ~2x what `benchmarks/bandwidth.py`'s `stream`
reader did on one thread. torch's sum (aten/src/ATen/native/cpu/SumKernel.cpp, `row_sum` -> `multi_row_sum` with
4 rows a row stride apart) walks ONE contiguous stream, 4 vectors of 64 bytes per iteration, in address order.
So this run compares the number of streams a core walks at once (`read_bytes(..., streams=S)`: each 1 MiB item
as S sub-ranges, a 2 KB piece from each in turn) and the software prefetch, on a buffer on 2 MiB pages the size
of a decode's weights, every reader `--repeats` times in turn (a neighbour's burst slows all of them alike):

    python benchmarks/read_patterns.py [--gb 1] [--threads 1 2] [--repeats 5]

Prints, per thread count, each reader's median and best GB/s and its best as a fraction of `sum`'s best.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bandwidth  # noqa: E402
from benchmarks.gemv import cpu_name  # noqa: E402

STREAMS = (1, 2, 4, 8)


def readers() -> dict[str, callable]:
    from fovea.kernels.memory_read import read_bytes

    out = {"sum": lambda buffer: buffer.view(torch.bfloat16).sum()}
    for prefetch in (False, True):
        for streams in STREAMS:
            name = f"stream S={streams}{' +pf' if prefetch else ''}"
            out[name] = lambda buffer, s=streams, p=prefetch: read_bytes(buffer, prefetch=p, streams=s)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0, help="buffer size in GB (>> the last-level cache)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    buffer = bandwidth.huge_page_buffer(int(args.gb * 1e9) // bandwidth.HUGE_PAGE * bandwidth.HUGE_PAGE)
    print(f"{cpu_name()}, {buffer.nbytes / 1e9:.2f} GB, "
          f"{bandwidth.huge_page_bytes(buffer) / buffer.nbytes:.0%} of it on 2 MiB pages")
    fns = readers()
    for threads in args.threads:
        torch.set_num_threads(threads)
        rates: dict[str, list[float]] = {name: [] for name in fns}
        for fn in fns.values():  # untimed: the code and the first touch
            fn(buffer)
        for _ in range(args.repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn(buffer)
                rates[name].append(buffer.nbytes / (time.perf_counter() - start) / 1e9)
        top = max(rates["sum"])
        print(f"{threads} thread(s), {args.repeats} reads each, interleaved:")
        for name, values in rates.items():
            print(f"    {name:16s} median {statistics.median(values):5.1f}  best {max(values):5.1f} GB/s"
                  f"  = {max(values) / top:6.1%} of sum's best")


if __name__ == "__main__":
    main()

"""The row-major bfloat16 kernel (`fovea.kernels.rows_linear`) against the panel kernel (`bf16_linear`), in ONE
process, calls alternating: decode GB/s of weights read and prefill GFLOP/s, per shape and row count.

Shapes: OPT-2.7b (BLIP-2's language model: q/k/v/o 2560x2560, fc1 10240x2560, fc2 2560x10240, lm_head 50272x2560)
and Qwen2-0.5B (q 896x896, k/v 128x896, gate/up 2 x 4864x896 as two sources, down 896x4864, lm_head 151936x896).
The panel kernel runs the same layer packed as one matrix (the stacked gate/up as `PackedLinear` packs it).

Decode (`--rows`, default 1 2 4 8): each shape in enough copies to read `--decode-bytes` (default 128 MB, 4x the
last-level cache) per pass, so the weights stream from memory; GB/s = the weights' bytes / the pass's time, best
and median of `--repeats` passes per kernel, passes alternating. Prefill (`--gemm-rows`, default 16 64 257 512
2048): one copy, GFLOP/s = 2 M N K / the call's time, best of `--repeats`; lm_head is left out (a prefill runs it
on the last rows only) unless `--gemm-lm-head`.

`--file-backed`: the row kernel's W are read-only views of a file mapping (page cache, 4 KiB pages: what the
loader keeps), written once to `--dir`; else they are anonymous memory. `--threads 1 2`: each in turn.

`--baseline FILE`: another version of csrc/rows_linear.cpp (`git show main:fovea/kernels/csrc/rows_linear.cpp >
/tmp/base.cpp`), built as its own small extension (this tree's headers) and timed beside the others, alternating:
before / after in one process, each also as a ratio to the panel kernel.

    python benchmarks/rows_linear.py --threads 1 2 --file-backed
    python benchmarks/rows_linear.py --models qwen --rows 1 --gemm-rows          # decode only, Qwen only
    python benchmarks/rows_linear.py --threads 1 --gemm-rows --file-backed --baseline /tmp/base.cpp

Timings on a shared machine mean little alone: read the ratio (same process, alternating, best of several). By
default the rates are per CPU second (`--clock cpu`), which leaves out the time other tenants held the core.
"""
from __future__ import annotations

import argparse
import datetime
import math
import mmap
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gemv import cpu_name  # noqa: E402


@dataclass(frozen=True, slots=True)
class Shape:
    name: str
    sizes: tuple[int, ...]  # rows of each source, stacked along N
    k: int

    @property
    def n(self) -> int:
        return sum(self.sizes)


MODELS = {
    "opt": [Shape("opt q/k/v/o", (2560,), 2560), Shape("opt fc1", (10240,), 2560), Shape("opt fc2", (2560,), 10240),
            Shape("opt lm_head", (50272,), 2560)],
    "qwen": [Shape("qwen q/o", (896,), 896), Shape("qwen k/v", (128,), 896), Shape("qwen gate+up", (4864, 4864), 896),
             Shape("qwen down", (896,), 4864), Shape("qwen lm_head", (151936,), 896)],
}


class Weights:
    """`copies` random W [N, K] of one shape, as the panel kernel's packed copies and as the row kernel's sources
    (anonymous memory, or views of one read-only file mapping)."""

    def __init__(self, shape: Shape, copies: int, file_dir: Path | None, huge_pages: bool):
        from fovea.kernels import extension, panels

        g = torch.Generator().manual_seed(shape.n + shape.k)
        dense = [torch.randn(shape.n, shape.k, generator=g).div(shape.k ** 0.5).bfloat16() for _ in range(copies)]
        self.packed = [panels.pack_weight(w) for w in dense]
        self._mapping = None
        if file_dir is None and huge_pages:
            rows = []
            for w in dense:
                copy = torch.empty_like(w)
                extension().advise_huge_pages(copy)  # before the first touch, as the packed copies are
                rows.append(copy.copy_(w))
        elif file_dir is None:
            rows = dense
        else:
            fd, path = tempfile.mkstemp(dir=file_dir, suffix=".bin")
            with os.fdopen(fd, "wb") as f:
                for w in dense:
                    w.view(torch.uint8).numpy().tofile(f)
            del dense
            with open(path, "rb") as f:
                self._mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            os.unlink(path)  # the mapping keeps the file's pages
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "not writable": read-only is the point
                flat = torch.frombuffer(self._mapping, dtype=torch.bfloat16)
            rows = list(flat.view(copies, shape.n, shape.k).unbind(0))
        self.sources = [list(w.split(list(shape.sizes))) for w in rows]


def build_baseline(source: Path):
    """`source` (a rows_linear.cpp) as an extension of its own exposing `rows_linear`, with fovea's flags."""
    import hashlib
    from torch.utils.cpp_extension import load

    from fovea.kernels import build

    csrc = Path(build.__file__).resolve().parent / "csrc"
    key = hashlib.sha1(source.read_bytes() + (csrc / "common.h").read_bytes()).hexdigest()[:12]
    directory = Path(tempfile.gettempdir()) / f"fovea_rows_baseline_{key}"
    directory.mkdir(exist_ok=True)
    bindings = directory / "bindings.cpp"
    bindings.write_text('#include <torch/extension.h>\n#include "ops.h"\nPYBIND11_MODULE(TORCH_EXTENSION_NAME, m) '
                        '{ m.def("rows_linear", &fovea::rows_linear); }\n')
    return load(f"fovea_rows_baseline_{key}", [str(source), str(bindings)], build_directory=str(directory),
                extra_cflags=[*build.CFLAGS, f"-I{csrc}"], extra_ldflags=["-fopenmp"])


def time_passes(calls: dict[str, callable], repeats: int, clock) -> dict[str, list[float]]:
    """Seconds per pass of each callable by `clock`, passes alternating between them."""
    for fn in calls.values():
        fn()  # warm: code, page tables
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return times


def process_cpu_per_thread(threads: int):
    """CPU seconds of the process divided by the thread count: on a shared machine, the time the threads were
    running (a thread waiting for its turn on a core counts in wall time, not here; a thread spinning at the
    parallel region's end counts here)."""
    return lambda: time.process_time() / threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["opt", "qwen"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, nargs="*", default=[1, 2, 4, 8], help="decode row counts")
    parser.add_argument("--gemm-rows", type=int, nargs="*", default=[16, 64, 257, 512, 2048])
    parser.add_argument("--gemm-lm-head", action="store_true", help="also time lm_head at the GEMM row counts")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-bytes", type=float, default=128e6)
    parser.add_argument("--file-backed", action="store_true", help="the row kernel reads a read-only file mapping")
    parser.add_argument("--huge-pages", action="store_true",
                        help="anonymous W advised onto 2 MiB pages, as the panel kernel's packed copies are")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another rows_linear.cpp, timed beside (before / after in one process)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the file is written")
    parser.add_argument("--shapes", nargs="*", default=None, help="only shapes whose name contains one of these")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="cpu (default): the calling thread's CPU time at 1 thread, the process's per thread "
                             "at more; wall: elapsed time (meaningful on a quiet machine only)")
    args = parser.parse_args()

    from fovea import kernels
    from fovea.kernels import bf16_linear, rows_linear

    kernels.set_mode("require")
    assert rows_linear.available() and bf16_linear.available(), kernels.status().summary()
    baseline = build_baseline(args.baseline) if args.baseline else None
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{cpu_name()}, {now}, load average {os.getloadavg()[0]:.1f}, {args.clock} time; row kernel's W in "
          f"{'a read-only file mapping (4 KiB page cache)' if args.file_backed else 'anonymous memory'}"
          f"{' advised onto 2 MiB pages' if args.huge_pages and not args.file_backed else ''}; "
          f"ratios are rows / panel, best of {args.repeats} alternating", flush=True)
    shapes = [s for m in args.models for s in MODELS[m]
              if args.shapes is None or any(part in s.name for part in args.shapes)]
    for shape in shapes:
        nbytes = shape.n * shape.k * 2
        copies = max(1, math.ceil(args.decode_bytes / nbytes)) if args.rows else 1
        weights = Weights(shape, copies, args.dir if args.file_backed else None, args.huge_pages)
        n = shape.n

        def panel_pass(xs, count):
            for i in range(count):
                bf16_linear.linear(xs, weights.packed[i], n, None)

        def rows_pass(xs, count):
            for i in range(count):
                rows_linear.linear(xs, weights.sources[i], n, None)

        def base_pass(xs, count):
            for i in range(count):
                baseline.rows_linear(xs, weights.sources[i], n, None)

        def kernels_timed(xs, count):
            calls = {"panel": lambda: panel_pass(xs, count), "rows": lambda: rows_pass(xs, count)}
            return calls | ({"base": lambda: base_pass(xs, count)} if baseline else {})

        def base_column(rate, unit_width):
            if not baseline:
                return ""
            return (f" | base best {max(rate['base']):{unit_width}.1f} {max(rate['base']) / max(rate['panel']):.2f}x, "
                    f"rows / base {max(rate['rows']) / max(rate['base']):.2f}x")

        for threads in args.threads:
            torch.set_num_threads(threads)
            clock = time.perf_counter if args.clock == "wall" else (
                time.thread_time if threads == 1 else process_cpu_per_thread(threads))
            for m in args.rows:
                x = torch.randn(m, shape.k).bfloat16()
                times = time_passes(kernels_timed(x, copies), args.repeats, clock)
                rate = {k: [copies * nbytes / t / 1e9 for t in v] for k, v in times.items()}
                print(f"  {shape.name:14s} {n:6d}x{shape.k:<5d} {threads}t decode {m:4d} rows: panel best "
                      f"{max(rate['panel']):5.1f} med {statistics.median(rate['panel']):5.1f} | rows best "
                      f"{max(rate['rows']):5.1f} med {statistics.median(rate['rows']):5.1f} GB/s | "
                      f"{max(rate['rows']) / max(rate['panel']):.2f}x{base_column(rate, 5)}", flush=True)
            if "lm_head" in shape.name and not args.gemm_lm_head:
                continue
            for m in args.gemm_rows:
                x = torch.randn(m, shape.k).bfloat16()
                times = time_passes(kernels_timed(x, 1), args.repeats, clock)
                flops = 2 * m * n * shape.k
                rate = {k: [flops / t / 1e9 for t in v] for k, v in times.items()}
                print(f"  {shape.name:14s} {n:6d}x{shape.k:<5d} {threads}t gemm   {m:4d} rows: panel best "
                      f"{max(rate['panel']):6.1f} | rows best {max(rate['rows']):6.1f} GFLOP/s | "
                      f"{max(rate['rows']) / max(rate['panel']):.2f}x{base_column(rate, 6)}", flush=True)
        del weights


if __name__ == "__main__":
    main()

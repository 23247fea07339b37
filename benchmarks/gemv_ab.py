"""The bfloat16 (or int8: W8A16, W8A8) linear kernels of two source trees in ONE process, interleaved: same-run
ratios of a kernel change at decode row counts on a machine whose bandwidth moves from minute to minute (issue 16).

Both trees' `fovea/kernels/csrc` are built as the one extension each would build (`fovea.kernels.build`, cached
by their sources, so two trees give two modules side by side); the weights are packed once (the layout is the
same) and every call alternates between them. Layers: `--layers` decoder layers of Qwen2-0.5B's shape and its
`lm_head`, as `benchmarks/gemv.py` (0.39 GB for 4 layers: 12x the last-level cache).

    python benchmarks/gemv_ab.py --baseline /work/main [--rows 1 2 4 8] [--threads 1 2] [--repeats 7] [--int8]
                                 [--w8a8] [--clock thread]
    python benchmarks/gemv_ab.py --baseline /work/main --reader   # memory_read's stream, without prefetch

Prints, per thread count and row count, each tree's best and median GB/s of weights read and the ratio of the
bests; with `--reader`, the same for `read_bytes(prefetch=False)` over a 1 GB buffer on 2 MiB pages.
`--clock thread` times 1 thread by the calling thread's CPU time (`time.thread_time`: torch runs a 1-thread
kernel in the calling thread), so the time the scheduler gives other processes on a shared machine is not
counted (the memory bus they share still is); 2 and more threads keep the wall clock. On the busy machine of
2026-12-07 17:09 UTC the wall clock gave an unchanged kernel 0.70-1.18x of itself, the CPU time 1.00x.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gemv import HIDDEN, INTERMEDIATE, QKV, VOCAB, cpu_name  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="the other source tree (its repository root)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--int8", action="store_true", help="the int8 kernel instead of the bfloat16 one")
    parser.add_argument("--w8a8", action="store_true", help="the W8A8 int8 kernel (int8 activations)")
    parser.add_argument("--reader", action="store_true", help="memory_read's reader instead of a linear kernel")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="thread: 1 thread timed by its CPU time (see above)")
    args = parser.parse_args()
    from fovea.kernels import build, int8_linear, panels

    here = Path(__file__).resolve().parent.parent
    trees = {"baseline": args.baseline.resolve(), "this tree": here}
    modules = {name: build.build(build.BuildSpec(source_dir=root / "fovea" / "kernels" / "csrc"))
               for name, root in trees.items()}
    if args.reader:
        compare_readers(modules, args)
        return
    shapes = [(QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)] * args.layers
    shapes.append((VOCAB, HIDDEN))
    weights = [torch.randn(n, k, generator=torch.Generator().manual_seed(i)).bfloat16()
               for i, (n, k) in enumerate(shapes)]
    if args.int8:
        # random int8 codes and per-channel scales: the kernel reads the same bytes whatever the values
        packed = [int8_linear.pack_weight(torch.randint(-128, 128, (n, k), dtype=torch.int8)) for n, k in shapes]
        scales = [torch.rand(n) / 64 for n, _ in shapes]
        num_bytes = sum(p.nbytes for p in packed)

        def call(module, i, x):
            return module.int8_linear(x, packed[i], shapes[i][0], scales[i], None)
    elif args.w8a8:
        packs = [int8_linear.pack_weight_w8a8(torch.randint(-128, 128, (n, k), dtype=torch.int8)) for n, k in shapes]
        packed = [p for p, _ in packs]
        scales = [torch.rand(n) / 64 for n, _ in shapes]
        num_bytes = sum(p.nbytes for p in packed)

        def call(module, i, x):  # x: (int8 rows, their scales), quantized once outside the timing
            return module.int8_dynamic_linear(x[0], x[1], packed[i], packs[i][1], shapes[i][0], scales[i], None,
                                              torch.bfloat16)
    else:
        packed = [panels.pack_weight(w) for w in weights]
        num_bytes = sum(p.nbytes for p in packed)

        def call(module, i, x):
            return module.bf16_linear(x, packed[i], shapes[i][0], None)

    kind = "W8A8" if args.w8a8 else "int8" if args.int8 else "bfloat16"
    print(f"{cpu_name()}, {kind}: {len(shapes)} layers, {num_bytes / 1e9:.2f} GB "
          f"of packed weights; baseline {trees['baseline']} vs this tree {here}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        clock = time.thread_time if args.clock == "thread" and threads == 1 else time.perf_counter
        for rows in args.rows:
            xs = [torch.randn(rows, k).bfloat16() for _, k in shapes]
            if args.w8a8:
                from fovea.layers.quantization.int8 import quantize_activation_per_token

                xs = [quantize_activation_per_token(x) for x in xs]
            for i, x in enumerate(xs):  # the results agree (the same bits: the arithmetic is the same)
                same = torch.equal(call(modules["baseline"], i, x), call(modules["this tree"], i, x))
                if not same:
                    print(f"    layer {i} {shapes[i]} at {rows} rows: the two trees' results differ")
            rates: dict[str, list[float]] = {name: [] for name in modules}
            for _ in range(args.repeats):
                for name, module in modules.items():
                    start = clock()
                    for i, x in enumerate(xs):
                        call(module, i, x)
                    rates[name].append(num_bytes / (clock() - start) / 1e9)
            report(f"{threads} thread(s), {rows:2d} row(s){', CPU time' if clock is time.thread_time else ''}", rates)


def report(what: str, rates: dict[str, list[float]]) -> None:
    base, new = rates["baseline"], rates["this tree"]
    print(f"  {what}: baseline best {max(base):5.1f} median {statistics.median(base):5.1f} | this tree best "
          f"{max(new):5.1f} median {statistics.median(new):5.1f} GB/s | best {max(new) / max(base):.2f}x, median "
          f"{statistics.median(new) / statistics.median(base):.2f}x", flush=True)


def compare_readers(modules: dict, args) -> None:
    from benchmarks import bandwidth

    buffer = bandwidth.huge_page_buffer(1 << 30)
    print(f"{cpu_name()}, read_bytes(prefetch=False) over {buffer.nbytes / 1e9:.2f} GB, "
          f"{bandwidth.huge_page_bytes(buffer) / buffer.nbytes:.0%} on 2 MiB pages; also torch.sum as bfloat16")
    # the baseline's reader may predate the `streams` argument
    readers = {name: (lambda m=module, extra=(() if name == "baseline" else (1,)): m.read_bytes(buffer, False, 1 << 20,
                                                                                              *extra))
               for name, module in modules.items()}
    readers["sum"] = lambda: buffer.view(torch.bfloat16).sum()
    for threads in args.threads:
        torch.set_num_threads(threads)
        rates: dict[str, list[float]] = {name: [] for name in readers}
        for fn in readers.values():
            fn()
        for _ in range(args.repeats):
            for name, fn in readers.items():
                start = time.perf_counter()
                fn()
                rates[name].append(buffer.nbytes / (time.perf_counter() - start) / 1e9)
        report(f"{threads} thread(s), reader", rates)
        print(f"    torch.sum best {max(rates['sum']):5.1f} median {statistics.median(rates['sum']):5.1f} GB/s")


if __name__ == "__main__":
    main()

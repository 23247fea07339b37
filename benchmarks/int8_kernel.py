"""fovea's int8 weight-only kernel against bfloat16 (fovea's AVX-512 BF16 kernel where it runs, oneDNN) and torch's
int8 kernel, layer by layer: the linear layers of Qwen2-0.5B's decoder (qkv 896 -> 1152, o 896 -> 896, gate/up
896 -> 9728, down 4864 -> 896), enough layers that the weights do not fit in the caches (each step reads them from
memory, as decode does). Per row count: milliseconds for all of them (best of `--repeats`, the methods
interleaved), and for the decode rows the rate the weights are read at (int8: 1 byte per weight, bfloat16: 2).

First, the kernels' arithmetic rate at one row on one thread, the weight in L2 (a 384 x 896 layer called over and
over): the GB/s of weights a core can consume when memory is not what limits it. A kernel whose rate here is
not well above the machine's read bandwidth cannot stream at that bandwidth (this is what showed the int8
widening through int32 and float32 to be the bound at one row, before the table look-up).

    python benchmarks/int8_kernel.py [--rows 1 4 16 64 512] [--layers 8] [--repeats 7] [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = ((896, 1152), (896, 896), (896, 9728), (4864, 896))  # (K, N) of one Qwen2-0.5B decoder layer
ATEN_MAX_ROWS = 16  # torch's int8 kernel slows down past this (fovea never runs it there)


def in_cache_rates(repeats: int, calls: int = 200) -> dict[str, float]:
    """GB/s of weights consumed from L2 at one row on one thread, best of `repeats` (see the module docstring)."""
    from fovea.kernels import bf16_linear, int8_linear
    from fovea.layers.quantization.int8 import quantize_weight_per_channel

    n, k = 384, 896  # int8 0.34 MB, bfloat16 0.69 MB: both in a Zen 4 core's 1 MB L2
    q, scale = quantize_weight_per_channel(torch.randn(n, k) * 0.02, torch.bfloat16)
    x = torch.randn(1, k).bfloat16()
    runs = {"fovea int8": (lambda p=int8_linear.pack_weight(q): int8_linear.linear(x, p, n, scale, None), n * k)}
    if bf16_linear.available():
        packed = bf16_linear.pack_weight(q.bfloat16())
        runs["fovea bf16"] = (lambda: bf16_linear.linear(x, packed, n, None), 2 * n * k)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best = dict.fromkeys(runs, float("inf"))
    try:
        for _ in range(repeats):
            for name, (run, _) in runs.items():
                start = time.perf_counter()
                for _ in range(calls):
                    run()
                best[name] = min(best[name], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {name: calls * runs[name][1] / best[name] / 1e9 for name in runs}


def main() -> None:
    from fovea import kernels
    from fovea.kernels import bf16_linear, int8_linear
    from fovea.layers.quantization.int8 import quantize_weight_per_channel

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 512])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels.set_mode("require")
    if not int8_linear.available():
        raise SystemExit(f"fovea's int8 kernel does not run here: {kernels.status().int8_linear.describe()}")
    rates = in_cache_rates(args.repeats)
    print("in L2, 1 row, 1 thread (the arithmetic rate): "
          + "  ".join(f"{name} {rate:.1f} GB/s" for name, rate in rates.items()))
    layers = []
    has_bf16 = bf16_linear.available()
    for _ in range(args.layers):
        for k, n in SHAPES:
            q, scale = quantize_weight_per_channel(torch.randn(n, k) * 0.02, torch.bfloat16)
            dense = torch.ops.mkldnn._reorder_linear_weight(q.bfloat16() * scale[:, None], 64)
            panels = bf16_linear.pack_weight(q.bfloat16() * scale[:, None]) if has_bf16 else None
            layers.append((k, n, q, scale, int8_linear.pack_weight(q), dense, panels))
    num_weights = sum(n * k for k, n, *_ in layers)
    print(f"{args.layers} x Qwen2-0.5B decoder layers' linears ({num_weights / 1e6:.0f} M weights), "
          f"{args.threads} threads, best of {args.repeats}")

    for rows in args.rows:
        xs = {k: torch.randn(rows, k).bfloat16() for k, _ in SHAPES}
        methods = {
            "fovea int8": lambda: [int8_linear.linear(xs[k], p, n, s, None) for k, n, _, s, p, _, _ in layers],
            "bf16 oneDNN": lambda: [torch.ops.mkldnn._linear_pointwise(xs[k], d, None, "none", [], "")
                                    for k, n, _, _, _, d, _ in layers],
        }
        if has_bf16:
            methods["bf16 fovea"] = lambda: [bf16_linear.linear(xs[k], b, n, None) for k, n, *_, b in layers]
        if rows <= ATEN_MAX_ROWS:
            methods["aten int8"] = lambda: [torch.ops.aten._weight_int8pack_mm(xs[k], q, s)
                                            for k, n, q, s, *_ in layers]
        best = {name: float("inf") for name in methods}
        for _ in range(args.repeats):
            for name, run in methods.items():
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
        line = "  ".join(f"{name} {t * 1e3:7.2f} ms" for name, t in best.items())
        rates = {name: num_weights * (2 if "bf16" in name else 1) / t / 1e9 for name, t in best.items()}
        bf16 = "bf16 fovea" if has_bf16 else "bf16 oneDNN"
        print(f"rows {rows:4d}: {line}   fovea int8 / {bf16}: {best[bf16] / best['fovea int8']:.2f}x   "
              + "  ".join(f"{name} {r:.1f} GB/s" for name, r in rates.items()), flush=True)


if __name__ == "__main__":
    main()

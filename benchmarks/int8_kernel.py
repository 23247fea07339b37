"""fovea's int8 weight-only kernel against bfloat16 on oneDNN and torch's int8 kernel, layer by layer: the linear
layers of Qwen2-0.5B's decoder (qkv 896 -> 1152, o 896 -> 896, gate/up 896 -> 9728, down 4864 -> 896), enough
layers that the weights do not fit in the caches (each step reads them from memory, as decode does). Per row count:
milliseconds for all of them (best of `--repeats`, the methods interleaved), and for the decode rows the rate the
weights are read at (int8: 1 byte per weight, bfloat16: 2).

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


def main() -> None:
    from fovea import kernels
    from fovea.kernels import int8_linear
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
    layers = []
    for _ in range(args.layers):
        for k, n in SHAPES:
            q, scale = quantize_weight_per_channel(torch.randn(n, k) * 0.02, torch.bfloat16)
            dense = torch.ops.mkldnn._reorder_linear_weight(q.bfloat16() * scale[:, None], 64)
            layers.append((k, n, q, scale, int8_linear.pack_weight(q), dense))
    num_weights = sum(n * k for k, n, *_ in layers)
    print(f"{args.layers} x Qwen2-0.5B decoder layers' linears ({num_weights / 1e6:.0f} M weights), "
          f"{args.threads} threads, best of {args.repeats}")

    for rows in args.rows:
        xs = {k: torch.randn(rows, k).bfloat16() for k, _ in SHAPES}
        methods = {
            "fovea int8": lambda: [int8_linear.linear(xs[k], p, n, s, None) for k, n, _, s, p, _ in layers],
            "bf16 oneDNN": lambda: [torch.ops.mkldnn._linear_pointwise(xs[k], d, None, "none", [], "")
                                    for k, n, _, _, _, d in layers],
        }
        if rows <= ATEN_MAX_ROWS:
            methods["aten int8"] = lambda: [torch.ops.aten._weight_int8pack_mm(xs[k], q, s)
                                            for k, n, q, s, _, _ in layers]
        best = {name: float("inf") for name in methods}
        for _ in range(args.repeats):
            for name, run in methods.items():
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
        line = "  ".join(f"{name} {t * 1e3:7.2f} ms" for name, t in best.items())
        rates = {name: num_weights * (2 if "bf16" in name else 1) / t / 1e9 for name, t in best.items()}
        print(f"rows {rows:4d}: {line}   fovea int8 / bf16: {best['bf16 oneDNN'] / best['fovea int8']:.2f}x   "
              + "  ".join(f"{name} {r:.1f} GB/s" for name, r in rates.items()), flush=True)


if __name__ == "__main__":
    main()

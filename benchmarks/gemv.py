"""bfloat16 linear layers at decode and prefill row counts: fovea's AVX-512 BF16 kernel (and its AMX kernel where
the CPU has AMX) vs oneDNN's packed linear vs torch's `F.linear`, against the machine's read bandwidth, same run.

Decode reads every weight once per step, so what counts there is GB/s of weights read: the layers are those of
`--layers` decoder layers of Qwen2-0.5B's shape (qkv 1152 x 896, o 896 x 896, gate/up 9728 x 896, down
896 x 4864) and its 151936 x 896 `lm_head` (4 layers and the head: 0.39 GB, 12x the last-level cache of the AMD
EPYC, so every call reads its weight from memory; ~2 GB in all with each method's copy). Each row count runs every layer
once per timing, every method in turn, `--repeats` times, and the best time of each counts (on a shared machine
the slowest runs measure the neighbours). `sum` is the memory-read bound: a plain `torch.sum` over as many bytes,
in the same loop.

Prefill is compute: for `--prefill-rows` the GFLOP/s of each method on the same layers.

    python benchmarks/gemv.py [--rows 1 2 4 8 12 16 24 32] [--prefill-rows 128 512] [--layers 4] [--repeats 5]
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HIDDEN, INTERMEDIATE, QKV, VOCAB = 896, 4864, 1152, 151936


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.SubprocessError, StopIteration):
        return platform.processor() or "unknown CPU"


def methods(weights: list[torch.Tensor]) -> dict[str, callable]:
    """name -> f(i, x) running layer i on x, each holding the weights in its own layout."""
    from fovea.kernels import amx_linear, bf16_linear

    out = {}
    if bf16_linear.available():
        panels = [bf16_linear.pack_weight(w) for w in weights]
        out["fovea-avx512"] = lambda i, x: bf16_linear.linear(x, panels[i], weights[i].shape[0], None)
    if amx_linear.available() and all(amx_linear.supports(w) for w in weights):
        tiles = [amx_linear.pack_weight(w) for w in weights]
        out["fovea-amx"] = lambda i, x: amx_linear.linear(x, tiles[i], None)
    if torch.backends.mkldnn.is_available():
        onednn = [torch.ops.mkldnn._reorder_linear_weight(w, 64) for w in weights]
        out["onednn"] = lambda i, x: torch.ops.mkldnn._linear_pointwise(x, onednn[i], None, "none", [], "")
    out["torch"] = lambda i, x: F.linear(x, weights[i])
    return out


def best_times(fns: dict, weights: list[torch.Tensor], rows: int, repeats: int, total: torch.Tensor | None):
    xs = [torch.randn(rows, w.shape[1]).bfloat16() for w in weights]
    best = dict.fromkeys(list(fns) + (["sum"] if total is not None else []), float("inf"))
    for _ in range(repeats):
        for name in best:
            start = time.perf_counter()
            if name == "sum":
                total.sum()
            else:
                fn = fns[name]
                for i, x in enumerate(xs):
                    fn(i, x)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    from fovea import kernels

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8, 12, 16, 24, 32])
    parser.add_argument("--prefill-rows", nargs="*", type=int, default=[128, 512])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels.set_mode("require")
    print(f"{cpu_name()}, {args.threads} threads; {kernels.status().summary()}")

    shapes = [(QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)] * args.layers
    shapes.append((VOCAB, HIDDEN))
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=g).bfloat16() for n, k in shapes]
    num_bytes = sum(w.numel() * w.element_size() for w in weights)
    flops_per_row = 2 * sum(w.numel() for w in weights)
    fns = methods(weights)
    total = torch.ones(num_bytes // 2, dtype=torch.bfloat16)
    print(f"{len(weights)} layers, {num_bytes / 1e9:.2f} GB of bfloat16 weights; decode: GB/s of weights read "
          f"(best of {args.repeats})")
    names = list(fns) + ["sum"]
    print(f"{'rows':>5s} " + " ".join(f"{n:>13s}" for n in names) + "   fovea / onednn")
    for rows in args.rows:
        best = best_times(fns, weights, rows, args.repeats, total)
        fovea = best.get("fovea-avx512", float("nan"))
        ratio = best["onednn"] / fovea if "onednn" in best else float("nan")
        print(f"{rows:5d} " + " ".join(f"{num_bytes / best[n] / 1e9:13.1f}" for n in names) + f"   {ratio:.2f}x",
              flush=True)
    if args.prefill_rows:
        print(f"prefill: GFLOP/s (best of {args.repeats})")
        print(f"{'rows':>5s} " + " ".join(f"{n:>13s}" for n in fns) + "   fovea / onednn")
        for rows in args.prefill_rows:
            best = best_times(fns, weights, rows, args.repeats, None)
            fovea = best.get("fovea-avx512", float("nan"))
            ratio = best["onednn"] / fovea if "onednn" in best else float("nan")
            print(f"{rows:5d} " + " ".join(f"{rows * flops_per_row / best[n] / 1e9:13.1f}" for n in fns)
                  + f"   {ratio:.2f}x", flush=True)


if __name__ == "__main__":
    main()

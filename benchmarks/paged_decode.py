"""Paged decode attention (`fovea.kernels.paged_decode`) against a plain read of the same K/V bytes, same run.

A decode step's attention reads every cached key and value of every running request once, so at offline batch
sizes it is bound by memory: OPT-125m (the BLIP-2 benchmark's LM: 12 layers of 12 heads x 64, bfloat16) holds
36.9 KB of K/V per token, so 64 requests of ~106 tokens read 23.6 MB per layer and 283 MB per step. The requests'
blocks are scattered over the pool (`--blocks scattered`, the default: decode steps interleave the requests' block
allocations) or lie in order (`--blocks in-order`). For each request count the script times the
kernel on one layer's cache and a `torch.sum` over the same two tensors, interleaved, best of `--repeats`; it
prints both as milliseconds of wall and of the calling thread's CPU time (on a shared machine the thread's time
moves less with the neighbours' load), and the kernel's time as a multiple of the read.

    python benchmarks/paged_decode.py [--requests 1 8 64] [--blocks scattered] [--heads 12] [--kv-heads 12]
                                      [--head-dim 64] [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.gemv import cpu_name  # noqa: E402

BLOCK_SIZE = 16


def timed(fn, min_seconds: float) -> tuple[float, float]:
    """(wall, thread CPU) seconds per call, over at least `min_seconds` of wall."""
    fn()
    wall, cpu, calls = time.perf_counter(), time.thread_time(), 0
    while time.perf_counter() - wall < min_seconds or calls < 2:
        fn()
        calls += 1
    return (time.perf_counter() - wall) / calls, (time.thread_time() - cpu) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--blocks", choices=["scattered", "in-order"], default="scattered")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from fovea import kernels

    kernels.configure("require")
    print(f"{cpu_name()}, {args.threads} threads, bfloat16, {args.heads} heads ({args.kv_heads} kv) x {args.head_dim}, "
          f"blocks {args.blocks}")
    print(f"{'requests':>8s} {'K/V MB':>8s} {'kernel ms':>10s} {'read ms':>8s} {'x read':>7s}   "
          f"{'thread ms':>10s} {'read':>6s} {'x read':>7s}")
    gen = torch.Generator().manual_seed(0)
    for num in args.requests:
        contexts = [57 + (i * 7) % 100 for i in range(num)]  # the benchmark's prompts plus up to 100 outputs
        blocks = [-(-c // BLOCK_SIZE) for c in contexts]
        order = torch.randperm(sum(blocks), generator=gen) if args.blocks == "scattered" else torch.arange(sum(blocks))
        order = (1 + order).tolist()  # block 0 is the null block
        tables, used = [], 0
        for n in blocks:
            tables.append(order[used:used + n])
            used += n
        table = torch.tensor([t + [0] * (max(blocks) - len(t)) for t in tables])
        shape = ((sum(blocks) + 1) * BLOCK_SIZE, args.kv_heads, args.head_dim)
        k_cache, v_cache = (torch.randn(shape, generator=gen).bfloat16() for _ in range(2))
        q = torch.randn(num, args.heads, args.head_dim, generator=gen).bfloat16()
        lens = torch.tensor(contexts)
        scale = args.head_dim ** -0.5
        mbytes = 2 * sum(contexts) * args.kv_heads * args.head_dim * 2 / 1e6

        def kernel():
            kernels.paged_decode(q, k_cache, v_cache, table, lens, scale, BLOCK_SIZE)

        def read():
            k_cache.sum()
            v_cache.sum()

        best = {"kernel": (float("inf"),) * 2, "read": (float("inf"),) * 2}
        for _ in range(args.repeats):
            for name, fn in (("kernel", kernel), ("read", read)):
                wall, cpu = timed(fn, 0.1)
                best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
        (kw, kc), (rw, rc) = best["kernel"], best["read"]
        print(f"{num:8d} {mbytes:8.1f} {kw * 1e3:10.3f} {rw * 1e3:8.3f} {kw / rw:7.2f}   "
              f"{kc * 1e3:10.3f} {rc * 1e3:6.3f} {kc / rc:7.2f}", flush=True)


if __name__ == "__main__":
    main()

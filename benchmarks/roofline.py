"""A roofline per phase: this machine's peaks, and where one fovea run of each offline workload spends its time
against them.

Peaks, measured with torch on `--threads` threads: GEMM GFLOP/s per dtype (a square matmul, best of several) and
memory read GB/s (benchmarks/bandwidth.py's bound: the fastest of a streaming read and a `sum` over a buffer far
larger than the caches, on 2 MiB pages). Then one fovea run of each workload (the
requests of benchmarks/throughput.py for BLIP-2, benchmarks/throughput_qwen.py for Qwen2.5-VL and
benchmarks/throughput_llava.py for LLaVA-1.5 and, on throughput_llava_next.py's model, LLaVA-NeXT, after a warm-up,
prefix cache emptied) with a `PhaseRecorder` attached (benchmarks/roofline_phases.py: hooks from the outside,
nothing in fovea changes). For each phase: its time and share of the run, its GFLOP and GB, what it reached
(GFLOP/s, GB/s) and its fraction of the roofline: the time the machine's peaks allow for its FLOPs and bytes
(max(FLOPs / GEMM peak, bytes / read peak)) over the time it took. The recorder's hooks cost a little time
(a few microseconds per linear call): the run is ~2-5% slower than without them.

    python benchmarks/roofline.py [--workloads blip2 qwen llava llava_next] [--dtype bfloat16] [--num-requests 16]
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import bandwidth  # noqa: E402
from benchmarks.common import CACHE  # noqa: E402
from benchmarks.peers import machine_description  # noqa: E402
from benchmarks.roofline_phases import PhaseRecorder, PhaseTotals  # noqa: E402


WORKLOADS = ("blip2", "qwen", "llava", "llava_next")
"""The requests of throughput.py, throughput_qwen.py, throughput_llava.py, and throughput_llava.py's on
throughput_llava_next.py's model."""


@dataclass(slots=True)
class Peaks:
    gemm_gflops: dict[str, float]  # dtype name -> GFLOP/s
    read_gbs: float

    def bound_s(self, flops: float, nbytes: float, dtype: str) -> float:
        """The least time this machine needs for `flops` and `nbytes` (the roofline: whichever limit binds)."""
        return max(flops / (self.gemm_gflops[dtype] * 1e9), nbytes / (self.read_gbs * 1e9))


def best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN picks and caches its kernel, pages get touched
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_peaks(dtypes: list[str], size: int = 2048, read_mb: int = 512, repeats: int = 8) -> Peaks:
    gemm = {}
    for name in dtypes:
        a = torch.randn(size, size).to(getattr(torch, name))
        b = torch.randn(size, size).to(getattr(torch, name))
        gemm[name] = 2.0 * size ** 3 / best_seconds(lambda: torch.mm(a, b), repeats) / 1e9
    # far past the last-level cache, on 2 MiB pages as the packed weights; the fastest read of any reader
    # (benchmarks/bandwidth.py: the bound decode.py measures single-stream decode against)
    buffer = bandwidth.huge_page_buffer(read_mb << 20)
    read = bandwidth.ReadBound(bandwidth.measure(buffer, "peaks", repeats)).bound_gbs
    del buffer
    return Peaks(gemm_gflops=gemm, read_gbs=read)


def run_workload(name: str, dtype: str, num_requests: int) -> tuple[PhaseTotals, int]:
    """One recorded fovea run of a workload's requests; returns the phases and the useful output tokens."""
    from fovea import LLM, SamplingParams

    if name == "blip2":
        from benchmarks import throughput as bench
        path = bench.build_checkpoint(CACHE / "blip2-opt125m-vits14")
        texts, imgs, caps = bench.requests(num_requests)
        llm = LLM(str(path), dtype=dtype, max_model_len=512, max_num_seqs=num_requests)
        batch = [{"prompt": t, "multi_modal_data": {"image": im}} for t, im in zip(texts, imgs)]
        run = lambda items, params: llm.generate(items, params, use_tqdm=False)  # noqa: E731
    elif name == "qwen":
        from benchmarks import throughput_qwen as bench
        path = bench.build_checkpoint(CACHE / f"qwen2_5_vl-lm0.5b-vit8-{bench.MAX_PIXELS}", bench.MAX_PIXELS)
        conversations, imgs, caps = bench.requests(num_requests)
        # 512 MB of KV: 16 requests of <= 1024 tokens need ~200 MB; the process stays under 3 GB
        llm = LLM(str(path), dtype=dtype, max_model_len=1024, max_num_seqs=num_requests,
                  kv_cache_memory_bytes=1 << 29)
        batch = [[{"role": "user", "content": [{"type": "image_pil", "image_pil": im}, conv[0]["content"][1]]}]
                 for conv, im in zip(conversations, imgs)]
        run = lambda items, params: llm.chat(items, params, use_tqdm=False)  # noqa: E731
    else:  # llava / llava_next: throughput_llava.py's model and requests (the NeXT one with anyres tiles)
        from benchmarks import throughput_llava as bench
        if name == "llava":
            path = bench.build_checkpoint(CACHE / "llava1.5-clipL8-lm0.5b", 8)
            # 16 requests of ~700 tokens hold ~140 MB of KV
            max_model_len, kv_bytes = 1024, 1 << 29
        else:
            from benchmarks import throughput_llava_next as next_bench
            path = next_bench.build_checkpoint(CACHE / "llava-next-clipL8-lm0.5b", 8)
            max_model_len, kv_bytes = 4096, 1 << 30  # up to ~3,000 tokens a request, 12 KB of KV each: ~37 MB
        texts, imgs, caps = bench.requests(num_requests)
        llm = LLM(str(path), dtype=dtype, max_model_len=max_model_len, max_num_seqs=num_requests,
                  kv_cache_memory_bytes=kv_bytes)
        batch = [[{"role": "user", "content": [{"type": "image_pil", "image_pil": im}, {"type": "text", "text": t}]}]
                 for t, im in zip(texts, imgs)]
        run = lambda items, params: llm.chat(items, params, use_tqdm=False)  # noqa: E731
    params = [SamplingParams(temperature=0.0, max_tokens=c, ignore_eos=True) for c in caps]
    run(batch[:2], params[:2])  # warm-up
    llm.reset_prefix_cache()
    recorder = PhaseRecorder(llm)
    try:
        start = time.perf_counter()
        outs = run(batch, params)
        wall = time.perf_counter() - start
    finally:
        recorder.remove()
    recorder.totals.finish(wall)
    useful = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm
    gc.collect()
    return recorder.totals, useful


def format_phases(title: str, totals: PhaseTotals, peaks: Peaks, dtype: str) -> str:
    lines = [title, f"{'phase':22s} {'time s':>8s} {'share':>7s} {'GFLOP':>9s} {'GB':>8s} {'GFLOP/s':>9s} "
                    f"{'GB/s':>7s} {'bound by':>9s} {'of roofline':>12s}"]
    for name, p in totals.phases.items():
        if p.flops or p.bytes:
            bound = peaks.bound_s(p.flops, p.bytes, dtype)
            compute_s = p.flops / (peaks.gemm_gflops[dtype] * 1e9)
            kind = "compute" if compute_s >= bound else "memory"
            rates = (f"{p.flops / 1e9:9.1f} {p.bytes / 1e9:8.2f} {p.flops / 1e9 / max(p.seconds, 1e-9):9.1f} "
                     f"{p.bytes / 1e9 / max(p.seconds, 1e-9):7.1f} {kind:>9s} {bound / max(p.seconds, 1e-9):11.0%}")
        else:
            rates = f"{'-':>9s} {'-':>8s} {'-':>9s} {'-':>7s} {'-':>9s} {'-':>12s}"
        lines.append(f"{name:22s} {p.seconds:8.2f} {p.seconds / totals.wall_s:7.1%} {rates}")
    all_flops = sum(p.flops for p in totals.phases.values())
    all_bytes = sum(p.bytes for p in totals.phases.values())
    bound = sum(peaks.bound_s(p.flops, p.bytes, dtype) for p in totals.phases.values())
    lines.append(f"{'run':22s} {totals.wall_s:8.2f} {1:7.1%} {all_flops / 1e9:9.1f} {all_bytes / 1e9:8.2f} "
                 f"{'':>9s} {'':>7s} {'':>9s} {bound / totals.wall_s:11.0%}")
    lines.append(f"({totals.num_steps} steps, {totals.num_decode_steps} decode-only)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=["blip2", "qwen"])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--read-mb", type=int, default=512, help="buffer the memory-read peak sums over")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peaks = measure_peaks(["bfloat16", "float32"], read_mb=args.read_mb)
    print(f"machine: {machine_description()}, {args.threads} threads, torch {torch.__version__}")
    print("peaks: " + ", ".join(f"{k} GEMM {v:.0f} GFLOP/s" for k, v in peaks.gemm_gflops.items())
          + f", memory read {peaks.read_gbs:.1f} GB/s")
    for name in args.workloads:
        totals, useful = run_workload(name, args.dtype, args.num_requests)
        title = (f"\n{name}, {args.dtype}, {args.num_requests} requests, {useful} output tokens in {totals.wall_s:.1f} s "
                 f"({useful / totals.wall_s:.1f} tok/s)")
        print(format_phases(title, totals, peaks, args.dtype), flush=True)


if __name__ == "__main__":
    main()

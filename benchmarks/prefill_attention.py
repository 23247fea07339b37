"""A decoder's prefill attention alone: fovea's causal grouped-query kernel against torch's SDPA, same run.

At the offline workloads' shapes (random bfloat16 q, k, v as views of one packed qkv projection, as the layers hand
them over), times what fovea's `Attention.forward` runs for one engine step's prefills: fovea's AVX-512 BF16 kernel
(`fovea.kernels.encoder_attention.attention(..., causal=True)`, every prompt of the step in one call) against what
it ran before, torch's SDPA (one `is_causal` call per prompt, 4-D, `enable_gqa`; for a chunk after cached context,
one call with the causal mask, as `Attention._attend_blocks`). FLOPs are the useful ones (4 * head_dim per visible
(query, key) pair and head: half of the square for a whole prompt), so GFLOP/s compare as the times do. Best of
`--repeats`, wall time on `--threads` threads (default 1: the figures are per core).

With `--engine qwen` or `--engine llava`: the offline workload of benchmarks/throughput_qwen.py or
throughput_llava.py (`--num-requests` of its requests through `LLM.chat`, prefix cache emptied before each run;
`--prefill-only`: one output token each) on one loaded engine, alternating the LM's prefill attention between
fovea's kernel and torch's SDPA (switched from the outside, for the comparison only), so both see the same machine;
prints each run, the best of each side and their ratio. `--threads` defaults to 2 there (the engines' default).

    python benchmarks/prefill_attention.py [--shapes qwen llava llama7b chunk] [--repeats 20] [--threads 1]
    FOVEA_BENCH_CACHE=/work/bench-cache python benchmarks/prefill_attention.py --engine qwen [--num-requests 8]
        [--repeats 3] [--prefill-only]
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.roofline import best_seconds  # noqa: E402
from fovea.kernels import encoder_attention as attention_kernel  # noqa: E402
from fovea.layers import prefill_attention  # noqa: E402


@dataclass(frozen=True, slots=True)
class Shape:
    description: str
    heads: int
    kv_heads: int
    head_dim: int
    q_lengths: tuple[int, ...]
    cached: tuple[int, ...] = ()
    """tokens of cached context before each prompt (a prefix-cache hit or an earlier chunk); none: whole prompts"""


SHAPES = {
    # Qwen2-0.5B's LM (14 q heads over 2 kv heads of 64) under the Qwen2.5-VL workload's prompts of 64-400 tokens
    "qwen": Shape("Qwen2.5-VL offline: 8 prompts of 64-400 tokens", 14, 2, 64, (64, 100, 150, 200, 250, 300, 350, 400)),
    # the LLaVA-1.5 benchmark's LM has the same dimensions; its prompts are ~600 tokens (576 image tokens + text)
    "llava": Shape("LLaVA-1.5 offline: 4 prompts of ~600 tokens", 14, 2, 64, (596, 601, 605, 610)),
    "llama7b": Shape("Llama-7B (32 heads of 128): 2 prompts of 512 tokens", 32, 32, 128, (512, 512)),
    "chunk": Shape("Qwen LM: 2 chunks of 256 after 512 cached tokens", 14, 2, 64, (256, 256), (512, 512)),
}


def useful_flops(shape: Shape) -> float:
    cached = shape.cached or (0,) * len(shape.q_lengths)
    pairs = sum(n * c + n * (n + 1) // 2 for n, c in zip(shape.q_lengths, cached))
    return 4.0 * shape.head_dim * shape.heads * pairs


def run(name: str, repeats: int) -> None:
    shape = SHAPES[name]
    gen = torch.Generator().manual_seed(0)
    h, hkv, d = shape.heads, shape.kv_heads, shape.head_dim
    cached = shape.cached or (0,) * len(shape.q_lengths)
    rows = sum(shape.q_lengths)
    qkv = torch.randn(rows, (h + 2 * hkv) * d, generator=gen).bfloat16()
    q = qkv[:, :h * d].view(rows, h, d)
    cu_q = torch.tensor([0, *torch.tensor(shape.q_lengths).cumsum(0).tolist()], dtype=torch.int64)
    scale = d**-0.5
    if shape.cached:  # keys: the cached context then the chunk, gathered from the cache into one run per request
        k_lengths = [c + n for c, n in zip(cached, shape.q_lengths)]
        k, v = (torch.randn(sum(k_lengths), hkv, d, generator=gen).bfloat16() for _ in range(2))
    else:
        k_lengths = list(shape.q_lengths)
        k = qkv[:, h * d:(h + hkv) * d].view(rows, hkv, d)
        v = qkv[:, (h + hkv) * d:].view(rows, hkv, d)
    cu_k = torch.tensor([0, *torch.tensor(k_lengths).cumsum(0).tolist()], dtype=torch.int64)

    def kernel():
        return attention_kernel.attention(q, k, v, cu_q, cu_k, scale, causal=True)

    def sdpa():
        out = torch.empty(rows, h * d, dtype=torch.bfloat16)
        for i, (n, c) in enumerate(zip(shape.q_lengths, cached)):
            qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
            mask = None
            if c:
                mask = torch.arange(c + n)[None, :] <= torch.arange(n)[:, None] + c
            og = F.scaled_dot_product_attention(q[qs].transpose(0, 1)[None], k[ks].transpose(0, 1)[None],
                                                v[ks].transpose(0, 1)[None], attn_mask=mask, is_causal=mask is None,
                                                scale=scale, enable_gqa=hkv != h)
            out[qs] = og[0].transpose(0, 1).reshape(n, -1)
        return out

    with torch.inference_mode():
        diff = (kernel().view(rows, -1).float() - sdpa().float()).abs().max().item()
        kernel_s, sdpa_s = float("inf"), float("inf")
        for _ in range(repeats):  # alternating, so both see the same machine
            kernel_s = min(kernel_s, best_seconds(kernel, 1))
            sdpa_s = min(sdpa_s, best_seconds(sdpa, 1))
    flops = useful_flops(shape)
    print(f"{name}: {shape.description} ({h} q heads, {hkv} kv heads of {d}; {torch.get_num_threads()} threads)")
    print(f"  fovea kernel {1e3 * kernel_s:.2f} ms = {flops / kernel_s / 1e9:.0f} GFLOP/s, torch SDPA "
          f"{1e3 * sdpa_s:.2f} ms = {flops / sdpa_s / 1e9:.0f} GFLOP/s: {sdpa_s / kernel_s:.2f}x "
          f"(outputs differ by at most {diff:.3g})")


def torch_sdpa():
    """The LM's prefill attention on torch's SDPA, as before the kernel (the layer asks `runs_here` every call)."""
    return mock.patch.object(prefill_attention, "runs_here", lambda *args: False)


def run_engine(workload: str, num_requests: int, repeats: int, prefill_only: bool, threads: int) -> None:
    from benchmarks.common import CACHE, image_chats
    from benchmarks.peers import machine_description
    from fovea import LLM, SamplingParams

    if workload == "qwen":
        from benchmarks import throughput_qwen as bench
        path = bench.build_checkpoint(CACHE / f"qwen2_5_vl-lm0.5b-vit8-{bench.MAX_PIXELS}", bench.MAX_PIXELS)
        reqs = bench.requests(num_requests)
        chats, caps = bench.chats(reqs), reqs[2]
    else:
        from benchmarks import throughput_llava as bench
        path = bench.build_checkpoint(CACHE / "llava1.5-clipL8-lm0.5b", 8)
        texts, imgs, caps = bench.requests(num_requests)
        chats = image_chats(texts, imgs)
    caps = [1] * num_requests if prefill_only else caps
    llm = LLM(str(path), dtype="bfloat16", max_model_len=1024, max_num_seqs=num_requests,
              kv_cache_memory_bytes=1 << 30, num_threads=threads)
    params = [SamplingParams(temperature=0.0, max_tokens=c, ignore_eos=True) for c in caps]
    llm.chat(chats[:2], params[:2], use_tqdm=False)  # warm-up
    with torch_sdpa():
        llm.chat(chats[:2], params[:2], use_tqdm=False)
    print(f"machine: {machine_description()}, {threads} threads; {workload}: {num_requests} requests, "
          f"{sum(caps)} output tokens")
    best = {"fovea kernel": float("inf"), "torch SDPA": float("inf")}
    for _ in range(repeats):
        for side in best:
            llm.reset_prefix_cache()
            with torch_sdpa() if side == "torch SDPA" else contextlib.nullcontext():
                start = time.perf_counter()
                llm.chat(chats, params, use_tqdm=False)
                seconds = time.perf_counter() - start
            best[side] = min(best[side], seconds)
            print(f"  {side}: {seconds:.2f} s ({sum(caps) / seconds:.1f} tok/s)")
    print(f"best: fovea kernel {best['fovea kernel']:.2f} s, torch SDPA {best['torch SDPA']:.2f} s: "
          f"{best['torch SDPA'] / best['fovea kernel']:.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=None, help="default 20 for the kernel alone, 3 with --engine")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default 1 for the kernel alone: per-core figures; 2 with --engine)")
    parser.add_argument("--engine", choices=("qwen", "llava"), default=None,
                        help="time this offline workload end to end instead, kernel vs SDPA alternating")
    parser.add_argument("--num-requests", type=int, default=8)
    parser.add_argument("--prefill-only", action="store_true")
    args = parser.parse_args()
    if not attention_kernel.available():
        raise SystemExit("fovea's attention kernel does not run here (needs AVX-512 BF16)")
    if args.engine:
        run_engine(args.engine, args.num_requests, args.repeats or 3, args.prefill_only, args.threads or 2)
        return
    torch.set_num_threads(args.threads or 1)
    for name in args.shapes:
        run(name, args.repeats or 20)


if __name__ == "__main__":
    main()

"""The Qwen2.5-VL offline run with and without the prefill's last-layer pruning (`SupportsOutputRows`: the last
decoder layer runs past its q/k/v projection on the logits rows only), in one process on one loaded engine,
alternating, so both see the same machine.

The requests of benchmarks/throughput_qwen.py through `LLM.chat`, prefix cache emptied before each run; with
`--prefill-only` every request asks for one token (vision tower + prefill + one `lm_head` row each), otherwise for
the benchmark's `max_tokens`. Prints each run, the best of each side and pruned / unpruned throughput.

    python benchmarks/prefill_rows.py [--num-requests 8] [--repeats 3] [--prefill-only]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import throughput_qwen as bench  # noqa: E402
from benchmarks.common import CACHE  # noqa: E402
from benchmarks.peers import machine_description  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from fovea import LLM, SamplingParams

    path = bench.build_checkpoint(CACHE / f"qwen2_5_vl-lm0.5b-vit8-{bench.MAX_PIXELS}", bench.MAX_PIXELS)
    reqs = bench.requests(args.num_requests)
    caps = [1] * args.num_requests if args.prefill_only else reqs[2]
    llm = LLM(str(path), dtype="bfloat16", max_model_len=1024, max_num_seqs=args.num_requests,
              kv_cache_memory_bytes=1 << 30, num_threads=args.threads)
    runner = llm.llm_engine.runner
    chats = bench.chats(reqs)
    params = [SamplingParams(temperature=0.0, max_tokens=c, ignore_eos=True) for c in caps]
    llm.chat(chats[:2], params[:2], use_tqdm=False)  # warm-up
    best = {True: float("inf"), False: float("inf")}
    print(f"machine: {machine_description()}, {args.threads} threads; {args.num_requests} requests, "
          f"{sum(caps)} output tokens")
    for _ in range(args.repeats):
        for is_pruned in (True, False):
            runner.prunes_output_rows = is_pruned
            llm.reset_prefix_cache()
            start = time.perf_counter()
            llm.chat(chats, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            best[is_pruned] = min(best[is_pruned], seconds)
            print(f"{'pruned' if is_pruned else 'every row'}: {seconds:.2f} s ({sum(caps) / seconds:.1f} tok/s)")
    print(f"best: pruned {best[True]:.2f} s, every row {best[False]:.2f} s: {best[False] / best[True]:.3f}x")


if __name__ == "__main__":
    main()

"""The CPU work of a single-stream decode step outside the weights' streaming: thread CPU time per decode step of a
tiny Qwen2.5-VL LM (24 layers like the benchmark LM, hidden 128, bfloat16, 1 thread), where the Python, the torch
ops and the kernels' fixed costs are nearly all of a step. Same process, alternately with the decode plan
(fovea/models/llama_decode.py: each layer one loop of kernel calls) and with the modules (`fused_decode = False`),
medians over the decode steps of the engine's step and of `ModelRunner.execute`. Thread CPU time, so a busy
machine stretches it less than wall time (it still slows every cache miss).

    python benchmarks/decode_step.py [--tokens 100] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import CACHE  # noqa: E402
from benchmarks.gemv import cpu_name  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from fovea import LLM, SamplingParams
    from tests.oracle.qwen2_5_vl import build_tiny_qwen2_5_vl

    torch.set_num_threads(1)
    path = CACHE / "qwen2_5_vl-tiny-24layers"
    if not (path / "config.json").exists():
        build_tiny_qwen2_5_vl(path, num_layers=24, text_hidden=128, num_heads=8, num_kv_heads=2)
    llm = LLM(str(path), dtype="bfloat16", max_model_len=1024, max_num_seqs=4, kv_cache_memory_bytes=1 << 26)
    engine, runner = llm.llm_engine, llm.llm_engine.runner
    lm = runner.model.model.language_model
    steps: list[float] = []
    executes: list[float] = []

    def timed(fn, into):
        def wrapper(*args):
            start = time.thread_time()
            out = fn(*args)
            into.append(time.thread_time() - start)
            return out
        return wrapper

    engine.step, runner.execute = timed(engine.step, steps), timed(runner.execute, executes)
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    llm.generate(["hello world how are you"], params, use_tqdm=False)  # warm-up: the plan is decided here
    results = {True: [], False: []}
    for _ in range(args.repeats):
        for fused in (True, False):
            lm.fused_decode = fused
            steps.clear()
            executes.clear()
            llm.reset_prefix_cache()
            llm.generate(["hello world how are you"], params, use_tqdm=False)
            # the prompt's step and the first decode step left out
            results[fused].append((statistics.median(steps[2:]), statistics.median(executes[2:])))
    print(f"{cpu_name()}, 1 thread; tiny Qwen2.5-VL LM, 24 layers; thread CPU ms per decode step "
          f"(engine step / runner.execute), {args.repeats} alternating runs of {args.tokens} tokens")
    for fused, name in ((True, "decode plan"), (False, "modules")):
        print(f"  {name:12s} " + "  ".join(f"{s * 1e3:.2f} / {e * 1e3:.2f}" for s, e in results[fused]))
    plan = statistics.median(s for s, _ in results[True])
    modules = statistics.median(s for s, _ in results[False])
    print(f"  modules / decode plan: {modules / plan:.2f}x the CPU time per step")


if __name__ == "__main__":
    main()

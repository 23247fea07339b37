"""The multi-process executor's per-step price: the same decode run in process and in worker process(es).

On the tiny test checkpoints (tests/oracle: BLIP-2 with a 2-layer OPT, Qwen2.5-VL with a 2-layer Qwen2), where a
step's math is a fraction of a millisecond, so what is left is the executor's own cost: pickling the scheduler
output once, a pipe write and read per rank, the reply. One request and then `--batch` requests decode
`--tokens` tokens greedily; each configuration's ms per step and its difference to the in-process run of the
same moment are printed (runs alternate, so a busy machine's noise hits both alike).

    python benchmarks/executor.py [--tokens 200] [--batch 16] [--repeats 3] [--pp 1]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def ms_per_step(llm, num_requests: int, num_tokens: int) -> float:
    from fovea import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True)
    prompts = [f"a photo of number {i}" for i in range(num_requests)]
    llm.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)  # warm
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return (time.perf_counter() - start) * 1e3 / num_tokens  # a decode step per token (the prefill is one more)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pp", type=int, default=1, help="also time this many pipeline stages (> 1)")
    args = parser.parse_args()
    from fovea import LLM
    from tests.oracle.qwen2_5_vl import build_tiny_qwen2_5_vl

    ckpt = str(build_tiny_qwen2_5_vl(Path(tempfile.mkdtemp()) / "qwen", seed=0))
    common = dict(dtype="float32", num_threads=1, max_model_len=1024)
    configs = {"in-process": dict(common), "mp tp1 pp1": dict(common, distributed_executor_backend="mp")}
    if args.pp > 1:
        configs[f"mp tp1 pp{args.pp}"] = dict(common, pipeline_parallel_size=args.pp)
    engines = {name: LLM(ckpt, **options) for name, options in configs.items()}
    for batch in (1, args.batch):
        times = {name: [] for name in engines}
        for _ in range(args.repeats):
            for name, llm in engines.items():
                times[name].append(ms_per_step(llm, batch, args.tokens))
        base = min(times["in-process"])
        for name, values in times.items():
            best = min(values)
            print(f"batch {batch:3d}  {name:12s}  {best:7.3f} ms/step  (+{best - base:6.3f} ms vs in-process)")


if __name__ == "__main__":
    main()

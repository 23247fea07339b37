"""What pipeline micro-batches give: the Qwen benchmark model (benchmarks/throughput_qwen.py: Qwen2-0.5B's LM, 24
layers, a reduced vision tower; bfloat16) on the same requests in three configurations, one after the other:

    pp1             one process, the model in the engine's process, `--threads` torch threads (all cores)
    pp2 one batch   two pipeline stages (worker processes, one core each), one step in the pipeline at a time:
                    the engine before micro-batches (its batch queue switched off on the loaded engine)
    pp2 micro       two stages with up to two steps in flight (fovea.engine.batch_queue)

Every request has its own image and `max_tokens` (EOS ignored), all submitted at once through `LLM.chat`; a
warm-up runs first and the prefix cache is reset before each timed run. Prints output tokens/s and the ratios
between the configurations (on a shared machine only the ratios of one run mean anything).

    python benchmarks/pipeline.py [--num-requests 16] [--max-tokens 48] [--threads 2]
    flock /work/bigmem.lock python benchmarks/pipeline.py      # three processes of ~1 GB: under the memory lock
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import CACHE, Timer  # noqa: E402
from benchmarks.throughput_qwen import MAX_PIXELS, build_checkpoint, requests  # noqa: E402


def run(path: Path, reqs, options: dict, one_batch_at_a_time: bool = False) -> tuple[float, int, int]:
    """(seconds, output tokens, most steps in flight)"""
    from fovea import LLM, SamplingParams

    conversations, imgs, caps = reqs
    llm = LLM(str(path), dtype="bfloat16", max_model_len=1024, max_num_seqs=len(conversations),
              kv_cache_memory_bytes=1 << 30, **options)
    core = llm.llm_engine.engine_core
    if one_batch_at_a_time:  # what the engine did before micro-batches: EngineCore.step's one-step path
        core.batch_queue = None
        core.scheduler.track_in_flight = False
    messages = [[{"role": "user", "content": [{"type": "image_pil", "image_pil": im}, conv[0]["content"][1]]}]
                for conv, im in zip(conversations, imgs)]
    params = [SamplingParams(temperature=0.0, max_tokens=c, ignore_eos=True) for c in caps]
    llm.chat(messages[:2], params[:2], use_tqdm=False)  # warm-up
    llm.reset_prefix_cache()
    with Timer() as t:
        outs = llm.chat(messages, params, use_tqdm=False)
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert num_tokens == sum(caps)
    in_flight = core.batch_queue.max_batches_in_flight if core.batch_queue is not None else 1
    core.shutdown()
    del llm, core
    gc.collect()
    return t.seconds, num_tokens, in_flight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48, help="cap on each request's max_tokens (16..128)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the one-process run")
    args = parser.parse_args()
    path = build_checkpoint(CACHE / f"qwen2_5_vl-lm0.5b-vit8-{MAX_PIXELS}", MAX_PIXELS)
    conversations, imgs, caps = requests(args.num_requests)
    reqs = (conversations, imgs, [min(c, args.max_tokens) for c in caps])
    configs = {
        "pp1": (dict(num_threads=args.threads), False),
        "pp2 one batch": (dict(pipeline_parallel_size=2), True),
        "pp2 micro": (dict(pipeline_parallel_size=2), False),
    }
    rates = {}
    for name, (options, one_batch) in configs.items():
        seconds, num_tokens, in_flight = run(path, reqs, options, one_batch)
        rates[name] = num_tokens / seconds
        print(f"{name:14s} {num_tokens} tokens in {seconds:6.1f} s: {rates[name]:6.1f} tok/s "
              f"(at most {in_flight} step(s) in flight)", flush=True)
    print(f"pp2 micro / pp2 one batch: {rates['pp2 micro'] / rates['pp2 one batch']:.2f}x; "
          f"pp2 micro / pp1: {rates['pp2 micro'] / rates['pp1']:.2f}x; "
          f"pp2 one batch / pp1: {rates['pp2 one batch'] / rates['pp1']:.2f}x")


if __name__ == "__main__":
    main()

"""int8 vs bfloat16 on the Qwen benchmark model (`throughput_qwen.py`'s checkpoint: Qwen2-0.5B's language model,
a reduced vision tower), same run: single-stream decode speed, offline throughput, and how often greedy outputs
agree.

- single stream: one text request at a time; decode tok/s = (max_tokens - 1) / (time of a `max_tokens` request
  minus time of a 1-token request, same prompt, prefix cache reset), best of `--repeats`;
- offline: `throughput_qwen.py`'s requests (each with its own image and max_tokens), all at once through
  `LLM.chat`, useful output tokens/s;
- agreement: the offline run's greedy tokens, int8 vs bfloat16, position by position up to each request's first
  difference (after it the two continue from different text): the share of all tokens before any difference.

    python benchmarks/int8.py [--num-requests 16] [--decode-tokens 64] [--repeats 2] [--quantize-lm-head]
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import CACHE, Timer, prompts  # noqa: E402
from benchmarks.throughput_qwen import MAX_PIXELS, build_checkpoint, requests  # noqa: E402


def single_stream_decode(llm, prompt: str, num_tokens: int, repeats: int) -> float:
    from fovea import SamplingParams

    def timed(max_tokens: int) -> float:
        best = float("inf")
        for _ in range(repeats):
            llm.reset_prefix_cache()
            with Timer() as t:
                out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                                   use_tqdm=False)
            assert len(out[0].outputs[0].token_ids) == max_tokens
            best = min(best, t.seconds)
        return best

    return (num_tokens - 1) / (timed(num_tokens) - timed(1))


def offline(llm, reqs) -> tuple[float, list[list[int]]]:
    from fovea import SamplingParams

    conversations, imgs, caps = reqs
    messages = [[{"role": "user", "content": [{"type": "image_pil", "image_pil": im}, conv[0]["content"][1]]}]
                for conv, im in zip(conversations, imgs)]
    params = [SamplingParams(temperature=0.0, max_tokens=c, ignore_eos=True) for c in caps]
    llm.reset_prefix_cache()
    with Timer() as t:
        outs = llm.chat(messages, params, use_tqdm=False)
    ids = [list(o.outputs[0].token_ids) for o in outs]
    assert sum(map(len, ids)) == sum(caps)
    return sum(caps) / t.seconds, ids


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = 0
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            if u != v:
                break
            same += 1
    return same / sum(map(len, a))


def main() -> None:
    from fovea import LLM

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantize-lm-head", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = build_checkpoint(CACHE / f"qwen2_5_vl-lm0.5b-vit8-{MAX_PIXELS}", MAX_PIXELS)
    reqs = requests(args.num_requests)
    prompt = prompts(1, 10, 100000, seed=7)[0]
    print(f"Qwen benchmark model, {args.threads} threads; single stream: {args.decode_tokens} tokens, best of "
          f"{args.repeats}; offline: {args.num_requests} requests, {sum(reqs[2])} output tokens")
    results = {}
    for name, options in (("bfloat16", {}),
                          ("int8", {"quantization": "int8", "quantize_lm_head": args.quantize_lm_head})):
        llm = LLM(str(path), dtype="bfloat16", max_model_len=1024, max_num_seqs=args.num_requests,
                  kv_cache_memory_bytes=1 << 30, **options)
        llm.generate([prompt], use_tqdm=False)  # warm-up
        decode = single_stream_decode(llm, prompt, args.decode_tokens, args.repeats)
        throughput, ids = offline(llm, reqs)
        results[name] = (decode, throughput, ids)
        print(f"  {name:9s} single-stream decode {decode:7.1f} tok/s   offline {throughput:7.1f} tok/s", flush=True)
        del llm
        gc.collect()
    (d16, t16, ids16), (d8, t8, ids8) = results["bfloat16"], results["int8"]
    print(f"  int8 / bfloat16: decode {d8 / d16:.2f}x, offline {t8 / t16:.2f}x; greedy tokens identical before "
          f"the first difference: {agreement(ids16, ids8):.1%}")


if __name__ == "__main__":
    main()

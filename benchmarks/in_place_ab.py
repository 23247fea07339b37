"""Packed panels vs in-place weights (`EngineConfig.in_place_weights`), or the packed weights on 2 MiB vs 4 KiB
pages (`EngineConfig.huge_pages`), on one model, in ONE process, alternating.

    FOVEA_BENCH_CACHE=/work/bench-cache flock /work/bigmem.lock python benchmarks/in_place_ab.py \
        [--model blip2-opt-2.7b | DIR] [--policies none all] [--huge-pages auto auto] [--rounds 5] [--threads 2]

`--policies none none --huge-pages language_model none` compares the page sizes; `--packed-cache off DIR` the
packed weights in the process's memory against the same panels mapped from the packed weights cache's files
(`EngineConfig.packed_weights_cache`; DIR filled by an earlier run, or packed into by this one). Which engine loads first matters
on a VM (the second one's memory comes from what the host had taken back and backs anew): swap the two and take
both runs.

Why one process: this machine's memory bandwidth drifts by up to 1.7x over minutes (54-63 GB/s read quiet, 36
when other VMs on the host are busy), so two engines timed one after another (`real_size.py --in-place`) can differ
by more than what they are compared on. Here both engines are loaded side by side (the packed one's panels in
anonymous memory, the in-place one's weights in the page cache: about twice the checkpoint's bytes) and every
figure alternates between them, round by round: TTFT of one request on a fresh image, the decode steps of one
request, and those of 8 requests decoding together. Each line prints the median per engine and the ratio
(in place / packed for rates, packed / in place for times: above 1 means the in-place engine is faster).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import images, prompts  # noqa: E402
from benchmarks.peers import machine_description  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="blip2-opt-2.7b",
                        help="a checkpoint directory, or blip2-opt-2.7b (written once into FOVEA_BENCH_CACHE)")
    parser.add_argument("--policies", nargs=2, default=["none", "all"], metavar=("A", "B"),
                        help="in_place_weights of engine A and B")
    parser.add_argument("--huge-pages", nargs=2, default=["auto", "auto"], metavar=("A", "B"),
                        help="huge_pages of engine A and B")
    parser.add_argument("--packed-cache", nargs=2, default=["off", "off"], metavar=("A", "B"),
                        help="packed_weights_cache of engine A and B: off, or a directory (packed into at the "
                             "first start, mapped from at later ones)")
    parser.add_argument("--drop-page-cache", action="store_true",
                        help="after loading, drop the page cache's clean unmapped pages (root): the checkpoint's "
                             "7.5 GB beside two engines' weights leave the machine short of memory")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--decode-steps", type=int, default=16, help="decode steps timed per engine per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-model-len", type=int, default=512)
    args = parser.parse_args()

    from fovea import LLM, SamplingParams
    from fovea.worker.model_runner import available_memory_bytes

    model_dir = args.model
    if model_dir == "blip2-opt-2.7b":
        from benchmarks.real_size_checkpoints import blip2_opt_2_7b
        model_dir = str(blip2_opt_2_7b())
    print(machine_description())
    engines = {}
    names = [f"{policy}/{pages}" + ("" if cache == "off" else f"/cache:{Path(cache).name}")
             for policy, pages, cache in zip(args.policies, args.huge_pages, args.packed_cache)]
    if names[0] == names[1]:
        parser.error("engines A and B are the same; give --policies, --huge-pages or --packed-cache that differ")
    for name, policy, pages, cache in zip(names, args.policies, args.huge_pages, args.packed_cache):
        start = time.perf_counter()
        llm = LLM(model_dir, dtype="bfloat16", max_model_len=args.max_model_len, max_num_seqs=8,
                  num_threads=args.threads, kv_cache_memory_bytes=1 << 30, in_place_weights=policy,
                  huge_pages=pages, packed_weights_cache=cache)
        engines[name] = llm.llm_engine
        runner = llm.llm_engine.runner
        print(f"loaded {name!r} in {time.perf_counter() - start:.1f} s (side by side: not a load figure): "
              f"in place {runner.in_place_weights!r}, huge pages {runner.huge_pages!r}, packed weights cache "
              f"{runner.packed_cache.summary() if runner.packed_cache is not None else 'off'}")

    if args.drop_page_cache:  # the checkpoint's pages, read at load: two engines and them may not fit in memory
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1")
        print("dropped the page cache's unmapped pages (the checkpoint's); MemAvailable now "
              f"{available_memory_bytes() / 1e9:.1f} GB")

    counter = iter(range(1 << 30))
    seeds = iter(range(100, 1 << 30))

    def add(engine, num: int, max_tokens: int) -> None:
        seed = next(seeds)
        for text, image in zip(prompts(num, 10, 30000, seed=seed), images(num, seed=seed)):
            engine.add_request(f"r{next(counter)}", {"prompt": text, "multi_modal_data": {"image": image}},
                               SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))

    def ttft(engine) -> float:
        add(engine, 1, 1)
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        return time.perf_counter() - start

    def decode_steps(engine, num: int) -> list[float]:
        """The times of the steps in which all `num` requests decode (after every prompt's prefill)."""
        add(engine, num, args.decode_steps + 2)
        tokens: dict[str, int] = {}
        times = []
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            outputs = engine.step()
            elapsed = time.perf_counter() - start
            decoding = len(tokens) == num and min(tokens.values()) >= 1  # before this step
            for out in outputs:
                tokens[out.request_id] = len(out.outputs[0].token_ids)
            if decoding and not any(out.finished for out in outputs):
                times.append(elapsed)
        return times

    for engine in engines.values():  # warm-up: kernels built, first-touch of the KV cache
        ttft(engine)
        decode_steps(engine, 8)
    figures = {name: {p: [] for p in engines} for name in ("ttft_s", "step_1_s", "step_8_s")}
    for _ in range(args.rounds):
        for name, engine in engines.items():
            figures["ttft_s"][name].append(ttft(engine))
            figures["step_1_s"][name] += decode_steps(engine, 1)
            figures["step_8_s"][name] += decode_steps(engine, 8)
    a, b = names
    for name, per in figures.items():
        ma, mb = statistics.median(per[a]), statistics.median(per[b])
        print(f"{name:9} {a}: {ma * 1e3:8.1f} ms  {b}: {mb * 1e3:8.1f} ms  {a}/{b} = {ma / mb:.2f} "
              f"({len(per[a])} samples each, medians)")


if __name__ == "__main__":
    main()

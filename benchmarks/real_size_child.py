"""One engine's run for `benchmarks/real_size.py`, in a process of its own; prints one JSON line.

    python benchmarks/real_size_child.py fovea|vllm|transformers MODEL_DIR [--threads 2] [--decode-tokens 48]

fovea and vLLM share the code (fovea's `LLM` / `llm_engine.add_request` / `step` are vLLM's API): the engine is
stepped by hand so each token's arrival is timed. transformers runs `generate` with a streamer that stamps
each step.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import images, prompts  # noqa: E402

NUM_BATCH = 8
LOAD_WEIGHTS: dict[str, float] = {}


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM from here (Linux)


def decode_figures(token_times: list[list[float]], start: float) -> dict:
    """From each request's token arrival times: TTFT of the first, and decode tokens/s after the step where
    the last request got its first token."""
    last_first = max(times[0] for times in token_times)
    end = max(times[-1] for times in token_times)
    later = sum(1 for times in token_times for t in times if t > last_first)
    return {"ttft_s": token_times[0][0] - start, "tok_s": later / (end - last_first) if end > last_first else 0.0}


def requests(is_multimodal: bool, num: int, seed: int) -> list[tuple[str, object]]:
    texts = prompts(num, 10, 30000, seed=seed)
    imgs = images(num, seed=seed) if is_multimodal else [None] * num
    return list(zip(texts, imgs))


def run_llm_api(engine: str, model_dir: str, is_multimodal: bool, args) -> tuple[object, callable]:
    if engine == "fovea":
        from fovea import LLM, SamplingParams
        from fovea.worker import model_runner

        extra = {"num_threads": args.threads}
        if args.in_place is not None:  # which layers run from the checkpoint's pages (the rest pack panels)
            extra["in_place_weights"] = args.in_place
        if args.huge_pages is not None:  # which packed weights go on 2 MiB pages
            extra["huge_pages"] = args.huge_pages
        if args.packed_cache is not None:  # off; cold: an emptied cache directory; warm: as the last run left it
            from fovea.models.packed_cache import default_root

            root = default_root()
            if args.packed_cache == "cold":
                shutil.rmtree(root, ignore_errors=True)
            extra["packed_weights_cache"] = "off" if args.packed_cache == "off" else str(root)
        load_model = model_runner.load_model

        def timed_load_model(*a, **k):  # the weights alone, apart from the engine's profiling pass
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return load_model(*a, **k)
            finally:
                LOAD_WEIGHTS.update(weights_s=time.perf_counter() - wall, weights_cpu_s=time.process_time() - cpu)

        model_runner.load_model = timed_load_model
    else:
        from vllm import LLM, SamplingParams
        extra = {}
    llm = LLM(model_dir, dtype="bfloat16", max_model_len=args.max_model_len, max_num_seqs=NUM_BATCH, **extra)
    engine_ = llm.llm_engine
    counter = iter(range(1 << 30))

    def generate(reqs, max_tokens: int) -> list[list[float]]:
        ids = []
        for text, image in reqs:
            rid = f"r{next(counter)}"
            prompt = {"prompt": text, "multi_modal_data": {"image": image}} if image is not None else {"prompt": text}
            engine_.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
            ids.append(rid)
        times: dict[str, list[float]] = {rid: [] for rid in ids}
        while engine_.has_unfinished_requests():
            outputs = engine_.step()
            now = time.perf_counter()
            for out in outputs:
                got = times[out.request_id]
                got += [now] * (len(out.outputs[0].token_ids) - len(got))
        assert all(len(t) == max_tokens for t in times.values()), {k: len(v) for k, v in times.items()}
        return [times[rid] for rid in ids]

    return llm, generate


def run_transformers(model_dir: str, is_multimodal: bool, args) -> tuple[object, callable]:
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer

    if is_multimodal:
        model = transformers.AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
        processor = transformers.AutoProcessor.from_pretrained(model_dir)
        tokenizer = processor.tokenizer
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
        processor = tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []
            self.calls = 0

        def put(self, value):
            self.calls += 1
            if self.calls > 1:  # the first call is the prompt
                self.times.append(time.perf_counter())

        def end(self):
            pass

    def generate(reqs, max_tokens: int) -> list[list[float]]:
        texts = [text for text, _ in reqs]
        if is_multimodal:
            inputs = processor(images=[image for _, image in reqs], text=texts, return_tensors="pt", padding=True)
            inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        else:
            inputs = tokenizer(texts, return_tensors="pt", padding=True)
        config = transformers.GenerationConfig(max_new_tokens=max_tokens, min_new_tokens=0, do_sample=False,
                                               eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
        stamps = Stamps()
        with torch.inference_mode():
            model.generate(**inputs, generation_config=config, streamer=stamps)
        assert len(stamps.times) == max_tokens
        return [list(stamps.times) for _ in reqs]

    return model, generate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine", choices=["fovea", "vllm", "transformers"])
    parser.add_argument("model_dir")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=48)
    parser.add_argument("--batch-decode-tokens", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--in-place", choices=["language_model", "encoders", "all", "none"],
                        help="fovea's IN_PLACE_LAYERS (default: the module's)")
    parser.add_argument("--huge-pages", choices=["auto", "language_model", "none"])
    parser.add_argument("--packed-cache", choices=["cold", "warm", "off"],
                        help="fovea's packed weights cache under FOVEA_CACHE_DIR (default: EngineConfig's)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    config = json.loads((Path(args.model_dir) / "config.json").read_text())
    is_multimodal = "vision_config" in config

    reset_peak()
    before = status_bytes("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    if args.engine == "transformers":
        engine, generate = run_transformers(args.model_dir, is_multimodal, args)
    else:
        engine, generate = run_llm_api(args.engine, args.model_dir, is_multimodal, args)
    figures = {"load_s": time.perf_counter() - wall, "load_cpu_s": time.process_time() - cpu,
               "load_peak_bytes": status_bytes("VmHWM") - before, "loaded_bytes": status_bytes("VmRSS") - before,
               **LOAD_WEIGHTS}
    cache = getattr(getattr(engine, "llm_engine", None), "runner", None)
    cache = getattr(cache, "packed_cache", None) if args.engine == "fovea" else None
    if cache is not None:  # fovea's packed weights cache: layers mapped from it / packed into it
        figures["packed_cache"] = {"mapped": cache.num_mapped, "mapped_gb": cache.bytes_mapped / 1e9,
                                   "written": cache.num_written, "written_gb": cache.bytes_written / 1e9}

    # every request below has its own image and prompt (seeds 1.. are distinct draws)
    generate(requests(is_multimodal, 1, seed=1), 2)  # warm-up
    start = time.perf_counter()
    figures["ttft_s"] = decode_figures(generate(requests(is_multimodal, 1, seed=2), 1), start)["ttft_s"]
    start = time.perf_counter()
    one = decode_figures(generate(requests(is_multimodal, 1, seed=3), args.decode_tokens), start)
    figures["decode_1_tok_s"] = one["tok_s"]
    start = time.perf_counter()
    many = decode_figures(generate(requests(is_multimodal, NUM_BATCH, seed=4), args.batch_decode_tokens), start)
    figures["decode_8_tok_s"] = many["tok_s"]
    figures["process_peak_bytes"] = status_bytes("VmHWM")
    with open("/proc/self/smaps_rollup") as f:  # how the weights are mapped: 2 MiB at a time or 4 KiB
        rollup = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[-1:] == ["kB"]}
    figures["huge_mapped_gb"] = {"anon": rollup.get("AnonHugePages", 0) / 1e9,
                                 "file": rollup.get("FilePmdMapped", 0) / 1e9}
    figures["version"] = __import__(args.engine).__version__ if args.engine != "fovea" else "this tree"
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

"""Single-stream latency: time to first token (TTFT) for one 448x448 image and decode tokens/s of one request,
fovea vs transformers vs vLLM's CPU build, each engine in its own process (see benchmarks/peers.py).

One request at a time, nothing else running in the engine: the chat turn of the throughput benchmarks with a
448x448 image (256 LLM tokens on the Qwen benchmark model, 32 query tokens on BLIP-2) and a fixed 16-word prompt.
TTFT is the wall time of a request for 1 token, preprocessing included; decode tokens/s is (N - 1) / (time of a
request for N tokens - TTFT), both best of `--repeats`, every timed request on its own image (random pixels, same
size) after one warm-up request, so neither the prefix nor any encoder cache helps. EOS is ignored. fovea's run
also prints its TTFT split by part (image preprocessing, input processing, vision tower, Q-Former / merger, LM
prefill, lm_head, sampler, engine / Python: benchmarks/ttft_split.py) from the fastest of `--repeats` more
1-token requests with the recorder attached, and the TTFT's FLOP bound: the FLOPs of those requests' vision tower,
Q-Former / merger, prefill and lm_head (linear layers and attention products, counted from the shapes each call
ran on) over the GEMM peak measured in the same process, and the TTFT as a multiple of it ("TTFT / bound"; BLIP-2's
Q-Former runs float32 in every model dtype, so it also gets a bound with those FLOPs at the float32 peak).

    python benchmarks/latency.py --peers transformers vllm                    # Qwen benchmark model, bfloat16
    python benchmarks/latency.py --model blip2 --decode-tokens 64 --peers vllm
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import CACHE, Timer, image_chats  # noqa: E402
from benchmarks.peers import (EngineResult, add_peer_arguments, check_peer_arguments, digest,  # noqa: E402
                              engine_settings, engine_version, format_report, machine_description,
                              run_all, vllm_llm_options)

IMAGE_SIDE = 448
PROMPT = " ".join(f"w{1000 + 37 * i}" for i in range(16))


def image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8))


def checkpoint(model: str) -> Path:
    if model == "qwen":
        from benchmarks.throughput_qwen import MAX_PIXELS, build_checkpoint
        return build_checkpoint(CACHE / f"qwen2_5_vl-lm0.5b-vit8-{MAX_PIXELS}", MAX_PIXELS)
    from benchmarks.throughput import build_checkpoint
    return build_checkpoint(CACHE / "blip2-opt125m-vits14")


class LLMRunner:
    """fovea's or vLLM's offline `LLM` on one request at a time, by the same calls: `sampling_params` is the
    engine's SamplingParams class."""

    def __init__(self, llm, sampling_params, model: str):
        self.llm, self.sampling_params, self.model = llm, sampling_params, model

    def __call__(self, picture: Image.Image, max_tokens: int) -> int:
        params = self.sampling_params(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        self.llm.reset_prefix_cache()
        if self.model == "qwen":
            out = self.llm.chat(image_chats([PROMPT], [picture])[0], params, use_tqdm=False)[0]
        else:
            out = self.llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": picture}}, params,
                                    use_tqdm=False)[0]
        assert len(out.outputs[0].token_ids) == max_tokens
        return len(out.prompt_token_ids)


def fovea_runner(path: Path, model: str, dtype: str) -> LLMRunner:
    from fovea import LLM, SamplingParams

    llm = LLM(str(path), dtype=dtype, max_model_len=1024, max_num_seqs=1, kv_cache_memory_bytes=1 << 28)
    return LLMRunner(llm, SamplingParams, model)


def vllm_runner(path: Path, model: str, dtype: str) -> LLMRunner:
    from vllm import LLM, SamplingParams

    from benchmarks.throughput_qwen import MAX_PIXELS, MIN_PIXELS
    options = vllm_llm_options(MIN_PIXELS, MAX_PIXELS) if model == "qwen" else vllm_llm_options()
    return LLMRunner(LLM(str(path), dtype=dtype, max_model_len=1024, max_num_seqs=1, **options), SamplingParams, model)


class TransformersRunner:
    """transformers' generate on one request, inputs built as throughput_qwen.py / throughput.py build them."""

    def __init__(self, path: Path, model: str, dtype: str):
        from transformers import AutoTokenizer

        self.model_name, self.torch_dtype = model, getattr(torch, dtype)
        if model == "qwen":
            from transformers import Qwen2_5_VLForConditionalGeneration
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

            from benchmarks.throughput_qwen import MAX_PIXELS, MIN_PIXELS
            self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=self.torch_dtype).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.image_processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        else:
            from transformers import Blip2ForConditionalGeneration, Blip2Processor

            self.model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=self.torch_dtype).eval()
            self.processor = Blip2Processor.from_pretrained(path)
            self.model.language_model.generation_config.eos_token_id = None
        self.model.generation_config.eos_token_id = None

    def inputs(self, picture: Image.Image) -> dict:
        if self.model_name != "qwen":
            inputs = self.processor(images=[picture], text=[PROMPT], return_tensors="pt")
            inputs["pixel_values"] = inputs["pixel_values"].to(self.torch_dtype)
            return dict(inputs)
        config = self.model.config
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        pixels = self.image_processor(images=[picture], return_tensors="pt")
        count = int(pixels["image_grid_thw"].prod(-1)[0]) // config.vision_config.spatial_merge_size ** 2
        inputs = self.tokenizer([text.replace("<|image_pad|>", "<|image_pad|>" * count, 1)],
                                add_special_tokens=False, return_tensors="pt")
        return dict(inputs, pixel_values=pixels["pixel_values"].to(self.torch_dtype),
                    image_grid_thw=pixels["image_grid_thw"],
                    mm_token_type_ids=(inputs["input_ids"] == config.image_token_id).int())

    def __call__(self, picture: Image.Image, max_tokens: int) -> int:
        from transformers import GenerationConfig

        inputs = self.inputs(picture)  # inside the timed call: preprocessing counts, as on the other engines
        config = GenerationConfig(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                  eos_token_id=None, pad_token_id=1)
        with torch.inference_mode():
            out = self.model.generate(**inputs, generation_config=config)
        assert out.shape[1] - inputs["input_ids"].shape[1] == max_tokens
        return int(inputs["input_ids"].shape[1])


RUNNERS = {"fovea": fovea_runner, "vllm": vllm_runner, "transformers": TransformersRunner}


def measure(runner, decode_tokens: int, repeats: int) -> tuple[dict[str, float], int]:
    """Best-of-`repeats` TTFT and N-token request times, each on a fresh image; decode tok/s from the two."""
    prompt_tokens = runner(image(10_000), 4)  # warm-up on an image no timed request uses
    ttft = full = float("inf")
    for i in range(repeats):
        with Timer() as t:
            runner(image(2 * i), 1)
        ttft = min(ttft, t.seconds)
        with Timer() as t:
            runner(image(2 * i + 1), decode_tokens)
        full = min(full, t.seconds)
    decode = (decode_tokens - 1) / (full - ttft) if full > ttft else float("nan")
    return {"TTFT_s": ttft, "decode tok/s": decode, f"{decode_tokens}-token request_s": full}, prompt_tokens


def ttft_split(runner: LLMRunner, dtype: str, repeats: int):
    """The TTFT split by part (benchmarks/ttft_split.py) of the fastest of `repeats` recorded 1-token requests, each
    on a fresh image, and its FLOP bound (issue 16's target: TTFT within 1.2x of it): the vision tower's,
    Q-Former's / merger's, prefill's and lm_head's FLOPs over this machine's GEMM peaks measured now
    (benchmarks/roofline.py), all at `dtype`'s peak and each at the peak of the dtype it ran in.
    Returns (the split, the peaks, the figures for the report)."""
    from benchmarks.roofline import measure_peaks
    from benchmarks.ttft_split import TTFTRecorder  # fovea's modules: imported by fovea's run only

    best = None
    for i in range(repeats):
        recorder = TTFTRecorder(runner.llm)
        try:
            with Timer() as t:
                runner(image(20_000 + i), 1)
        finally:
            recorder.remove()
        recorder.split.finish(t.seconds)
        if best is None or recorder.split.wall_s < best.wall_s:
            best = recorder.split
    dtypes = sorted({dtype, *best.flops_by_dtype()})
    peaks = measure_peaks(dtypes, read_mb=64).gemm_gflops
    detail = {"TTFT GFLOP": sum(best.flops_by_dtype().values()) / 1e9,
              **{f"{d} GFLOP": f / 1e9 for d, f in sorted(best.flops_by_dtype().items())},
              **{f"{d} GEMM peak GFLOP/s": peaks[d] for d in dtypes},
              "TTFT FLOP bound s": best.bound_s(peaks, dtype)}
    if len(dtypes) > 1:  # BLIP-2's float32 Q-Former: its FLOPs at the float32 peak, the rest at `dtype`'s
        detail["TTFT FLOP bound, each dtype at its peak s"] = best.bound_s(peaks)
    return best, peaks, detail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["qwen", "blip2"], default="qwen")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    add_peer_arguments(parser)
    args = parser.parse_args()
    check_peer_arguments(parser, args)
    if args.decode_tokens < 2:
        parser.error(f"--decode-tokens must be at least 2 (decode speed needs a second token); got {args.decode_tokens}")
    torch.set_num_threads(args.threads)
    path = checkpoint(args.model)
    engine = args.engine or "fovea"
    if args.peers:
        results = run_all(Path(__file__), sys.argv[1:], args.peers, args.peer_python, args.threads)
        print(format_report(f"single-stream latency, {args.model} benchmark model, {args.dtype}, one "
                            f"{IMAGE_SIDE}x{IMAGE_SIDE} image, best of {args.repeats}", results, machine_description()))
        return
    runner = RUNNERS[engine](path, args.model, args.dtype)
    metrics, prompt_tokens = measure(runner, args.decode_tokens, args.repeats)
    detail = {}
    if engine == "fovea":
        split, peaks, detail = ttft_split(runner, args.dtype, args.repeats)
        for name in ("TTFT FLOP bound s", "TTFT FLOP bound, each dtype at its peak s"):
            if name in detail:
                detail["TTFT / " + name.removeprefix("TTFT FLOP ").removesuffix(" s")] = metrics["TTFT_s"] / detail[name]
        print(f"fovea's TTFT by part: the fastest of {args.repeats} recorded 1-token requests (hooks attached)\n"
              f"{split.table(peaks)}", flush=True)
    requests = [PROMPT, args.decode_tokens, [image(i) for i in range(2 * args.repeats)]]
    result = EngineResult(engine=engine, version=engine_version(engine), requests_digest=digest(*requests),
                          metrics=metrics, prompt_tokens=prompt_tokens,
                          settings={**engine_settings(engine, args.threads), "dtype": args.dtype}, detail=detail)
    if args.result:
        result.write(args.result)
    else:
        print(format_report(f"single-stream latency, {args.model}, {args.dtype}", [result], machine_description()))


if __name__ == "__main__":
    main()

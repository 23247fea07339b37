"""Shared set-up for the benchmarks: realistic-size random checkpoints and a large word-level tokenizer."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

CACHE = Path(os.environ.get("FOVEA_BENCH_CACHE", Path(__file__).resolve().parent.parent / "runs" / "bench"))


def word_tokenizer(vocab_size: int, specials: list[str]):
    """A word-level tokenizer whose every id decodes: `w<id>` words plus OPT-style specials first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(specials)}
    for i in range(len(specials), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def images(num: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        w, h = int(rng.integers(120, 640)), int(rng.integers(120, 480))
        out.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    return out


def prompts(num: int, vocab_lo: int, vocab_hi: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed + 1)
    return [" ".join(f"w{t}" for t in rng.integers(vocab_lo, vocab_hi, int(rng.integers(4, 40)))) for _ in range(num)]


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


# ---- what the offline throughput benchmarks share: arguments, timing loops, the printed comparison ----------------

def add_run_arguments(parser, *, num_requests: int, dtypes: list[str], hf_batch_sizes: list[int] | None = None,
                      repeats: bool = True) -> None:
    """The options every offline benchmark takes (each script gives its own defaults)."""
    parser.add_argument("--num-requests", type=int, default=num_requests)
    parser.add_argument("--dtypes", nargs="+", default=dtypes)
    if hf_batch_sizes is not None:
        parser.add_argument("--hf-batch-sizes", nargs="+", type=int, default=hf_batch_sizes)
    parser.add_argument("--threads", type=int, default=2)
    if repeats:
        parser.add_argument("--repeats", type=int, default=1, help="time each configuration this many times; "
                            "the fastest run counts (both sides alike)")


def image_chats(texts: list[str], imgs: list[Image.Image]) -> list[list[dict]]:
    """One user turn per request: its image (a PIL image part, as both fovea's and vLLM's `LLM.chat` take it),
    then its text."""
    return [[{"role": "user", "content": [{"type": "image_pil", "image_pil": im}, {"type": "text", "text": t}]}]
            for t, im in zip(texts, imgs)]


def time_offline(llm, method: str, inputs: list, params: list, repeats: int = 1, num_warmup: int = 2,
                 **kwargs) -> tuple[float, int, int]:
    """`llm.generate` or `llm.chat` on every request at once, fovea's and vLLM's `LLM` alike: a warm-up on the
    first `num_warmup`, then `repeats` timed runs, each with the prefix cache emptied first (no run reuses the
    prompts of the warm-up or of an earlier run). Returns (fastest seconds, useful output tokens, prompt tokens
    with image placeholders included); every request must have produced its `max_tokens`."""
    run = getattr(llm, method)
    warmup_kwargs = {k: v[:num_warmup] if isinstance(v, list) else v for k, v in kwargs.items()}
    run(inputs[:num_warmup], params[:num_warmup], use_tqdm=False, **warmup_kwargs)
    best = float("inf")
    for _ in range(repeats):
        llm.reset_prefix_cache()
        with Timer() as t:
            outs = run(inputs, params, use_tqdm=False, **kwargs)
        useful = sum(len(o.outputs[0].token_ids) for o in outs)
        assert useful == sum(p.max_tokens for p in params), (useful, sum(p.max_tokens for p in params))
        best = min(best, t.seconds)
    return best, useful, sum(len(o.prompt_token_ids) for o in outs)


def time_static_batches(generate, num_requests: int, batch_size: int, repeats: int = 1, num_warmup: int = 2) -> float:
    """transformers' way: `generate(lo, hi)` on static batches of `batch_size` one after the other, after a
    warm-up batch of `num_warmup`; the fastest of `repeats` passes over all requests, in seconds."""
    generate(0, num_warmup)
    best = float("inf")
    for _ in range(repeats):
        with Timer() as t:
            for lo in range(0, num_requests, batch_size):
                generate(lo, min(lo + batch_size, num_requests))
        best = min(best, t.seconds)
    return best


def print_transformers_row(dtype: str, batch_size: int, tokens_per_s: float, seconds: float) -> None:
    print(f"  {dtype:9s} transformers bs={batch_size:<3d} {tokens_per_s:8.1f} tok/s  ({seconds:.1f} s)", flush=True)


def print_fovea_row(dtype: str, tokens_per_s: float, seconds: float, transformers: dict[int, float]) -> None:
    """fovea's line, with its ratio against transformers' best batch size (`transformers`: tok/s per size)."""
    best_bs = max(transformers, key=transformers.get)
    print(f"  {dtype:9s} fovea              {tokens_per_s:8.1f} tok/s  ({seconds:.1f} s)   "
          f"ratio vs transformers' best (bs={best_bs}): {tokens_per_s / transformers[best_bs]:.2f}x", flush=True)


def compare_with_transformers(dtypes: list[str], hf_batch_sizes: list[int], run_transformers, run_fovea) -> None:
    """Per dtype: transformers at each static batch size, then fovea with its ratio against the best one.
    `run_transformers(dtype, batch_size)` and `run_fovea(dtype)` return (seconds, useful tokens, ...)."""
    for dtype in dtypes:
        hf = {}
        for bs in hf_batch_sizes:
            seconds, useful = run_transformers(dtype, bs)[:2]
            hf[bs] = useful / seconds
            print_transformers_row(dtype, bs, hf[bs], seconds)
        seconds, useful = run_fovea(dtype)[:2]
        print_fovea_row(dtype, useful / seconds, seconds, hf)

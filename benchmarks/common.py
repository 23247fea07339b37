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

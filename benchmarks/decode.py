"""Single-stream decode of the Qwen benchmark model (`throughput_qwen.py`'s checkpoint: Qwen2-0.5B's language
model, bfloat16) with fovea's AVX-512 BF16 linear kernel vs oneDNN's packed linear, against the memory-read bound,
same run.

Each linear path runs in its own process, one after the other (`--methods`): "fovea" is what the engine picks on
this host; "onednn" turns fovea's own bfloat16 kernels off for linear layers only (as before they existed).
Decode tok/s = (max_tokens - 1) / (time of a `max_tokens` request minus time of a 1-token request, same prompt,
prefix cache reset), best of `--repeats` (`int8.py`'s measure). The bound is the bytes a decode step must read
(every LM linear weight and the `lm_head`, bfloat16) over the read bandwidth of a plain `torch.sum` over 1 GB
measured in the same run (~54 GB/s on an idle AMD EPYC Zen 4 with 2 threads).

    flock /work/bigmem.lock python benchmarks/decode.py [--decode-tokens 64] [--repeats 3] [--methods fovea onednn]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import CACHE, prompts  # noqa: E402
from benchmarks.gemv import cpu_name  # noqa: E402
from benchmarks.throughput_qwen import MAX_PIXELS, build_checkpoint  # noqa: E402


def decode_bytes(path: Path) -> int:
    """Bytes of bfloat16 weights one decode step reads: the LM's linear layers and its lm_head."""
    text = json.loads((path / "config.json").read_text())["text_config"]
    h, i, layers, vocab = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"], text["vocab_size"]
    head_dim = h // text["num_attention_heads"]
    qkv = (text["num_attention_heads"] + 2 * text["num_key_value_heads"]) * head_dim * h
    per_layer = qkv + h * h + 2 * i * h + i * h
    return 2 * (layers * per_layer + vocab * h)


def read_bandwidth(threads: int, repeats: int = 5) -> float:
    torch.set_num_threads(threads)
    x = torch.ones(1 << 29, dtype=torch.bfloat16)  # 1 GB
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 2 / best


def run_one(method: str, path: Path, decode_tokens: int, repeats: int, threads: int) -> None:
    """In a child process: load, warm up, print one JSON line."""
    from benchmarks.int8 import single_stream_decode
    from fovea import LLM
    from fovea.layers import linear_methods

    torch.set_num_threads(threads)
    if method == "onednn":
        linear_methods.bf16_linear_supports = lambda weight: False
    llm = LLM(str(path), dtype="bfloat16", max_model_len=1024, max_num_seqs=4, kv_cache_memory_bytes=1 << 28)
    prompt = prompts(1, 10, 100000, seed=7)[0]
    llm.generate([prompt], use_tqdm=False)  # warm-up
    tok_s = single_stream_decode(llm, prompt, decode_tokens, repeats)
    print(json.dumps({"method": method, "tok_s": tok_s}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["fovea", "onednn"], choices=["fovea", "onednn"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    path = build_checkpoint(CACHE / f"qwen2_5_vl-lm0.5b-vit8-{MAX_PIXELS}", MAX_PIXELS)
    if args.child:
        run_one(args.child, path, args.decode_tokens, args.repeats, args.threads)
        return
    num_bytes = decode_bytes(path)
    bandwidth = read_bandwidth(args.threads)
    bound = bandwidth / num_bytes
    print(f"{cpu_name()}, {args.threads} threads; Qwen benchmark LM: {num_bytes / 1e9:.3f} GB read per decode step; "
          f"torch.sum reads {bandwidth / 1e9:.1f} GB/s: bound {bound:.1f} tok/s")
    results = {}
    for method in args.methods:
        out = subprocess.run([sys.executable, __file__, "--child", method, "--decode-tokens", str(args.decode_tokens),
                              "--repeats", str(args.repeats), "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])["tok_s"]
        print(f"  {method:7s} single-stream decode {results[method]:6.1f} tok/s = {results[method] / bound:5.1%} "
              f"of the bound ({num_bytes * results[method] / 1e9:.1f} GB/s)", flush=True)
    if {"fovea", "onednn"} <= results.keys():
        print(f"  fovea / onednn: {results['fovea'] / results['onednn']:.2f}x")


if __name__ == "__main__":
    main()

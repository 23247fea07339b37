"""The least time the Qwen2.5-VL offline workload (benchmarks/throughput_qwen.py) can take on this machine: its
FLOPs by phase, counted from the requests (no model runs), over the bf16 GEMM peak.

Counts, for `--num-requests` requests of throughput_qwen.py (their images through the checkpoint's image processor,
their chat prompts through its tokenizer): the vision tower's linear layers (8 blocks of width 640, the patch
embedding, the merger) and attention (windows in 6 blocks, whole images in 2), the LM's linear layers over every
prompt token (prefill) and every later token (decode), causal prefill attention, and `lm_head` once per output
token. Decode attention, norms, activations and rotary are left out (a few GFLOP). The bound in tokens/s is the
useful output tokens over (FLOPs / peak); with `--pruned` (the default) the prefill's last layer counts only its q/k/v
projection for prompt tokens that sample nothing (`SupportsOutputRows`). The peak is measured (a 2048^3 bf16 `torch.mm`, best of
8, `--threads`) unless `--gemm-gflops` gives it.

    python benchmarks/qwen_bound.py [--num-requests 32] [--gemm-gflops 420] [--vllm-tok-s 90.3]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import throughput_qwen as bench  # noqa: E402
from benchmarks.common import CACHE  # noqa: E402
from benchmarks.roofline import measure_peaks  # noqa: E402


def workload_flops(num_requests: int, is_pruned: bool) -> tuple[dict[str, float], int]:
    """({phase: FLOPs}, useful output tokens) of the benchmark's requests on its checkpoint's dimensions."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = bench.build_checkpoint(CACHE / f"qwen2_5_vl-lm0.5b-vit8-{bench.MAX_PIXELS}", bench.MAX_PIXELS)
    config = AutoConfig.from_pretrained(path)
    vision, text = config.vision_config, config.text_config
    tokenizer = AutoTokenizer.from_pretrained(path)
    conversations, imgs, caps = bench.requests(num_requests)
    grids = Qwen2VLImageProcessorPil(min_pixels=bench.MIN_PIXELS, max_pixels=bench.MAX_PIXELS)(
        images=imgs, return_tensors="pt")["image_grid_thw"]
    unit = vision.spatial_merge_size ** 2
    patches = grids.prod(-1).tolist()
    merged = [p // unit for p in patches]
    prompt_lens = [len(tokenizer(tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
                                 add_special_tokens=False).input_ids) - 1 + m  # the one pad becomes m tokens
                   for c, m in zip(conversations, merged)]
    d, inter = vision.hidden_size, vision.intermediate_size
    block = d * 3 * d + d * d + d * 2 * inter + inter * d
    channels = getattr(vision, "in_channels", None) or getattr(vision, "in_chans", 3)
    pixel_dim = channels * vision.temporal_patch_size * vision.patch_size ** 2
    merger = (d * unit) ** 2 + d * unit * vision.out_hidden_size
    window = (vision.window_size // vision.patch_size) ** 2  # patches in a whole window (edge ones: fewer; an upper bound)
    num_full = len(vision.fullatt_block_indexes)
    h, heads, kv_heads = text.hidden_size, text.num_attention_heads, text.num_key_value_heads
    head_dim = h // heads
    q, kv, mlp = h * heads * head_dim, 2 * h * kv_heads * head_dim, 3 * h * text.intermediate_size
    layer = q + kv + heads * head_dim * h + mlp
    num_prompt = sum(prompt_lens)
    # pruned: the last layer's o and MLP run for one row per request, its packed q/k/v projection for every row
    prefill_layers = text.num_hidden_layers * num_prompt * layer
    if is_pruned:
        prefill_layers -= (num_prompt - num_requests) * (layer - q - kv)
    flops = {
        "vision linears": 2.0 * (sum(patches) * (vision.depth * block + pixel_dim * d) + sum(merged) * merger),
        "vision attention": 4.0 * d * ((vision.depth - num_full) * sum(patches) * window
                                       + num_full * sum(p * p for p in patches)),
        "prefill linears": 2.0 * prefill_layers,
        "prefill attention": 4.0 * heads * head_dim * text.num_hidden_layers * sum(n * n / 2 for n in prompt_lens),
        "decode linears": 2.0 * (sum(caps) - num_requests) * text.num_hidden_layers * layer,
        "lm_head": 2.0 * sum(caps) * h * text.vocab_size,
    }
    return flops, sum(caps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gemm-gflops", type=float, help="the bf16 GEMM peak (default: measured here)")
    parser.add_argument("--vllm-tok-s", type=float, help="a measured vLLM figure, to print 1.3x of it against the bound")
    parser.add_argument("--pruned", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = args.gemm_gflops or measure_peaks(["bfloat16"], read_mb=64).gemm_gflops["bfloat16"]
    flops, useful = workload_flops(args.num_requests, args.pruned)
    total = sum(flops.values())
    print(f"{args.num_requests} requests, {useful} output tokens; bf16 GEMM peak {peak:.0f} GFLOP/s"
          f"{'' if args.gemm_gflops else ' (measured now)'}")
    for name, f in flops.items():
        print(f"{name:18s} {f / 1e9:8.1f} GFLOP {f / total:6.1%} {f / 1e9 / peak:7.2f} s")
    bound = useful / (total / 1e9 / peak)
    print(f"{'all':18s} {total / 1e9:8.1f} GFLOP {1:6.1%} {total / 1e9 / peak:7.2f} s -> at most {bound:.1f} tok/s")
    if args.vllm_tok_s:
        print(f"1.3x vLLM's {args.vllm_tok_s:.1f} tok/s = {1.3 * args.vllm_tok_s:.1f} tok/s = "
              f"{1.3 * args.vllm_tok_s / bound:.0%} of the bound (vLLM itself: {args.vllm_tok_s / bound:.0%})")


if __name__ == "__main__":
    main()

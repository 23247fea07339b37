"""The Qwen2.5-VL vision tower alone, on the images of benchmarks/throughput_qwen.py: time, GFLOP/s, and the share
of its attention.

Loads the benchmark checkpoint (`throughput_qwen.py` writes it into FOVEA_BENCH_CACHE), preprocesses the first
`--num-images` images with fovea's processor (outside the timed region) and runs `embed_multimodal` on all of them
at once, as the engine's first steps do, best of `--repeats` after a warm-up. The attention (`PackedSegments.attend`:
the window and full-frame runs) is timed separately by wrapping it, so its share of the tower shows; FLOPs count
the linear layers (2 x rows x in x out, the patch embedding and the merger included) and the attention products
(4 x head_dim x heads per query-key pair).

    python benchmarks/vision_qwen.py [--num-images 32] [--threads 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import throughput_qwen as bench  # noqa: E402
from benchmarks.common import CACHE, images  # noqa: E402
from benchmarks.peers import machine_description  # noqa: E402


def tower_flops(visual, grids: list[tuple[int, int, int]]) -> tuple[float, float]:
    """(linear FLOPs, attention FLOPs) of one pass over items of these (t, h, w) patch grids."""
    from fovea.models.qwen2_5_vl import VisionLayout

    linear = 0.0
    num_patches = sum(t * h * w for t, h, w in grids)
    unit = visual.merge ** 2
    for name, module in visual.named_modules():
        if hasattr(module, "in_features") and hasattr(module, "out_features"):
            rows = num_patches // unit if name.startswith("merger") else num_patches
            linear += 2.0 * rows * module.in_features * module.out_features
    linear += 2.0 * num_patches * visual.patch_dim * visual.patch_embed.proj.weight.shape[0]
    layout = VisionLayout.build(grids, visual.merge, visual.window)
    dim = visual.blocks[0].attn.num_heads * visual.blocks[0].attn.head_dim
    attention = 0.0
    for i in range(len(visual.blocks)):
        runs = layout.frame_runs if i in visual.fullatt_block_indexes else layout.window_runs
        attention += sum(4.0 * n * n * dim for n in runs)
    return linear, attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from fovea import LLM
    from fovea.layers import encoder_attention

    path = bench.build_checkpoint(CACHE / f"qwen2_5_vl-lm0.5b-vit8-{bench.MAX_PIXELS}", bench.MAX_PIXELS)
    llm = LLM(str(path), dtype="bfloat16", max_model_len=1024, max_num_seqs=1, kv_cache_memory_bytes=1 << 27,
              num_threads=args.threads)
    engine = llm.llm_engine
    model = engine.engine_core.runner.model
    pixels = engine.processor._images(images(args.num_images), {})
    values, grid = pixels["pixel_values"].to(torch.bfloat16), pixels["image_grid_thw"]
    grids = [tuple(g) for g in grid.tolist()]
    linear_flops, attention_flops = tower_flops(model.model.visual, grids)

    attend = encoder_attention.PackedSegments.attend
    attention_s = [0.0]

    def timed_attend(self, *a, **k):
        start = time.perf_counter()
        out = attend(self, *a, **k)
        attention_s[0] += time.perf_counter() - start
        return out

    encoder_attention.PackedSegments.attend = timed_attend
    best = (float("inf"), 0.0)
    with torch.inference_mode():
        model.embed_multimodal(pixel_values=values, image_grid_thw=grid)  # warm-up
        for _ in range(args.repeats):
            attention_s[0] = 0.0
            start = time.perf_counter()
            model.embed_multimodal(pixel_values=values, image_grid_thw=grid)
            best = min(best, (time.perf_counter() - start, attention_s[0]))
    encoder_attention.PackedSegments.attend = attend
    seconds, attn_s = best
    print(f"machine: {machine_description()}, {args.threads} threads, torch {torch.__version__}")
    print(f"{args.num_images} images, {values.shape[0]} patches, {sum(t * h * w // 4 for t, h, w in grids)} LM tokens")
    print(f"vision tower {seconds:.3f} s ({(linear_flops + attention_flops) / 1e9 / seconds:.1f} GFLOP/s): "
          f"linears {linear_flops / 1e9:.1f} GFLOP, attention {attention_flops / 1e9:.1f} GFLOP")
    print(f"attention {attn_s:.3f} s ({attn_s / seconds:.1%} of the tower, {attention_flops / 1e9 / attn_s:.1f} GFLOP/s); "
          f"the rest {seconds - attn_s:.3f} s ({linear_flops / 1e9 / (seconds - attn_s):.1f} GFLOP/s of linears)")


if __name__ == "__main__":
    main()

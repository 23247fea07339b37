"""The vision tower alone: fovea's encoder attention kernel against torch's SDPA, same model, same run.

Loads the throughput benchmarks' checkpoints (BLIP-2 OPT-125m with ViT-S/14 and its Q-Former: `throughput.py`;
LLaVA-1.5 with 8 CLIP ViT-L/14-336 blocks: `throughput_llava.py`; built on first use) and times the model's
`embed_multimodal` on `--images` random images per call, alternating between the two attention paths: fovea's
AVX-512 BF16 kernel (`fovea.kernels.encoder_attention`, what fovea runs) and torch's SDPA (what ran before, and
what transformers runs), switched from the outside for the comparison only. Also times the attention call alone at
each model's shape. Best of `--repeats`, wall time on `--threads` threads (the engines' default is all cores);
prints each path's time per image and the ratio, and how far the two paths' outputs are apart (max |difference|
relative to the largest output; 0 on the BLIP-2 checkpoint, whose ViT weights are initialised at 1e-10, so there
every attention is a near-uniform average; tests/kernels/test_encoder_attention.py checks the kernel's values).

    python benchmarks/vision_tower.py [--workloads blip2 llava] [--images 16] [--repeats 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import CACHE  # noqa: E402
from benchmarks.roofline import best_seconds  # noqa: E402
from fovea import LLM  # noqa: E402
from fovea.kernels import encoder_attention as attention_kernel  # noqa: E402


def torch_sdpa():
    """Encoder attention on torch's SDPA, as before the kernel (the layer asks `supports` before every call)."""
    return mock.patch.object(attention_kernel, "supports", lambda *args: False)


def checkpoint(workload: str) -> tuple[Path, int]:
    if workload == "blip2":
        from benchmarks.throughput import build_checkpoint
        return build_checkpoint(CACHE / "blip2-opt125m-vits14"), 224
    from benchmarks.throughput_llava import build_checkpoint
    return build_checkpoint(CACHE / "llava1.5-clipL8-lm0.5b", 8), 336


def attention_shape(model) -> tuple[int, int, int]:
    """(tokens, heads, head_dim) of one image in the tower's attention (BLIP's ViT and CLIP alike: patches + class)."""
    config = model.config.vision_config
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    return tokens, config.num_attention_heads, config.hidden_size // config.num_attention_heads


def run(workload: str, num_images: int, repeats: int) -> None:
    path, size = checkpoint(workload)
    llm = LLM(str(path), dtype="bfloat16", max_model_len=1024, max_num_seqs=4, kv_cache_memory_bytes=1 << 27)
    model = llm.llm_engine.runner.model
    pixels = torch.randn(num_images, 3, size, size, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.inference_mode():
        tower = lambda: torch.stack(model.embed_multimodal(pixel_values=pixels))  # noqa: E731
        fovea_out = tower()
        with torch_sdpa():
            sdpa_out = tower()
        diff = ((fovea_out.float() - sdpa_out.float()).abs().max() / sdpa_out.float().abs().max()).item()
        times = {"fovea kernel": [], "torch SDPA": []}
        for _ in range(repeats):  # alternating, so both see the same machine
            times["fovea kernel"].append(best_seconds(tower, 1))
            with torch_sdpa():
                times["torch SDPA"].append(best_seconds(tower, 1))
        tokens, heads, head_dim = attention_shape(model)
        qkv = torch.randn(num_images * tokens, 3, heads, head_dim).bfloat16()
        q, k, v = qkv.unbind(1)
        segments = attention_kernel.uniform_segments(num_images, tokens)
        batched = [t.view(num_images, tokens, heads, head_dim).transpose(1, 2) for t in (q, k, v)]
        kernel_s = best_seconds(lambda: attention_kernel.attention(q, k, v, segments, None, head_dim**-0.5), repeats)
        sdpa_s = best_seconds(lambda: F.scaled_dot_product_attention(*batched, scale=head_dim**-0.5), repeats)
    flops = 4.0 * num_images * heads * tokens * tokens * head_dim
    fovea_s, torch_s = min(times["fovea kernel"]), min(times["torch SDPA"])
    print(f"{workload}: {num_images} images per call, {torch.get_num_threads()} threads, best of {repeats}")
    print(f"  vision tower (embed_multimodal): fovea kernel {1e3 * fovea_s / num_images:.1f} ms/image, "
          f"torch SDPA {1e3 * torch_s / num_images:.1f} ms/image: {torch_s / fovea_s:.2f}x "
          f"(outputs differ by {diff:.2e} of the largest)")
    print(f"  attention alone ({tokens} tokens, {heads} heads of {head_dim}): fovea kernel "
          f"{flops / kernel_s / 1e9:.0f} GFLOP/s, torch SDPA {flops / sdpa_s / 1e9:.0f} GFLOP/s: "
          f"{sdpa_s / kernel_s:.2f}x")
    del llm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", choices=("blip2", "llava"), default=["blip2", "llava"])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not attention_kernel.available():
        raise SystemExit("fovea's encoder attention kernel does not run here (needs AVX-512 BF16)")
    for workload in args.workloads:
        run(workload, args.images, args.repeats)


if __name__ == "__main__":
    main()

"""Per-rank memory of the Qwen benchmark model (`throughput_qwen.py`'s: Qwen2-0.5B's language model, 14 query / 2
KV heads, 151936-token tied vocabulary, and an 8-layer vision tower) under tensor parallelism: the weight bytes each
rank holds (language model split, vision tower and merger replicated) and its KV-cache bytes per token.

Each `--tp` size runs its ranks as real processes (gloo over loopback) that build the model as a rank builds it
(`fovea.models.weights.build_model`, bfloat16, weights not loaded: nothing is read or touched, so this needs no
checkpoint and little memory) and count its parameters and its attention layers' KV heads.

    python benchmarks/tp_memory.py [--tp 1 2] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.throughput_qwen import benchmark_config  # noqa: E402

MiB = 1 << 20


def _rank(rank: int, tp_size: int, port: int, config, dtype: torch.dtype, results) -> None:
    from fovea.distributed import parallel_state as ps
    from fovea.layers.attention import Attention
    from fovea.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
    from fovea.models.weights import build_model

    ps.init_parallel(ps.ParallelLayout(tp_size=tp_size, rank=rank), f"tcp://127.0.0.1:{port}")
    try:
        model = build_model(Qwen2_5_VLForConditionalGeneration, config, dtype)
        by_part = {"language model": 0, "vision tower + merger": 0}
        for name, param in model.named_parameters():  # a tied lm_head is the embedding's parameter: counted once
            part = "vision tower + merger" if name.startswith("model.visual.") else "language model"
            by_part[part] += param.numel() * param.element_size()
        attention = [m for m in model.modules() if isinstance(m, Attention)]
        kv_per_token = sum(2 * a.num_kv_heads * a.head_dim for a in attention) * torch.tensor([], dtype=dtype).element_size()
        results[rank] = (by_part, kv_per_token, attention[0].num_heads, attention[0].num_kv_heads)
    finally:
        ps.destroy_parallel()


def measure(tp_size: int, config, dtype: torch.dtype) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(tp_size, port, config, dtype, results), nprocs=tp_size, join=True)
        return dict(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    config, _ = benchmark_config()
    dtype = getattr(torch, args.dtype)
    print(f"Qwen benchmark model ({args.dtype}): per-rank weights and KV cache")
    print(f"{'TP':>3} {'rank':>4} {'LM MiB':>8} {'vision MiB':>10} {'total MiB':>9} {'heads q/kv':>10} "
          f"{'KV B/token':>10}")
    for tp_size in args.tp:
        for rank, (by_part, kv, heads, kv_heads) in sorted(measure(tp_size, config, dtype).items()):
            lm, vision = by_part["language model"], by_part["vision tower + merger"]
            print(f"{tp_size:>3} {rank:>4} {lm / MiB:>8.1f} {vision / MiB:>10.1f} {(lm + vision) / MiB:>9.1f} "
                  f"{f'{heads}/{kv_heads}':>10} {kv:>10}")


if __name__ == "__main__":
    main()

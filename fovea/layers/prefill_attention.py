"""A decoder's prefill attention on fovea's AVX-512 BF16 kernel: the causal part of a paged step.

`Attention.forward` hands the step's prefill groups (one request each, more than one query row) here when the
kernel can take them (`runs_here`: bfloat16 q, k, v and KV cache, no position bias, a positive scale, the kernel
built and on). Torch's CPU flash SDPA ran this causal grouped-query attention at 25-35 GFLOP/s per core at the
Qwen2.5-VL workload's prompt lengths; the kernel (`fovea.kernels.encoder_attention`, `causal=True`) runs it at
~110-140 (`benchmarks/prefill_attention.py`), so it no longer costs far more than its share of the FLOPs.

- A whole prompt (`AttentionGroup.fresh_range`: no cached prefix) attends over its own scheduled keys: q, k, v go
  in as the projections' views, and every such prompt of a contiguous run of rows shares one kernel call (a
  prefill-only step is one run: one call for all of its prompts per layer).
- A chunk after cached context (a prefix-cache hit, a later chunk of a chunked prefill) attends over its
  request's blocks: they are gathered contiguously (one copy per block, as SDPA's path did) and the queries, the
  request's last positions, see them causally aligned bottom-right; every such chunk of the step in one call.

The arithmetic is SDPA's bfloat16 flash attention up to summation order and the exp (the kernel's docstring), so
the engine's parity tests against transformers hold as they did on SDPA.
"""
from __future__ import annotations

import torch

from fovea.kernels import encoder_attention as attention_kernel


def runs_here(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, scale: float) -> bool:
    """The step's q, k, v [N, heads * head_dim] (rows of any stride, contiguous columns) can go to the kernel."""
    return (scale > 0 and k_cache.dtype == torch.bfloat16 and k.stride(-1) == 1 and v.stride(-1) == 1
            and attention_kernel.supports(q, k, v, k_cache))


def _offsets(lengths: list[int]) -> torch.Tensor:
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int64)


def fresh_runs(ranges: list[tuple[int, int]]) -> list[tuple[int, list[int]]]:
    """Whole prompts' (first row, rows) -> runs of adjacent rows: (first row, each prompt's rows), in row order."""
    runs: list[tuple[int, list[int]]] = []
    for lo, n in sorted(ranges):
        if runs and runs[-1][0] + sum(runs[-1][1]) == lo:
            runs[-1][1].append(n)
        else:
            runs.append((lo, [n]))
    return runs


def attend_fresh(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: int, lengths: list[int], num_kv_heads: int,
                 scale: float) -> torch.Tensor:
    """Whole prompts on rows lo .. lo + sum(lengths) of the step: q [N, H, D], k, v [N, Hkv * D] (or [N, Hkv, D])
    -> [rows, H * D]."""
    hi = lo + sum(lengths)
    head_dim = q.shape[-1]
    offsets = _offsets(lengths)
    kv_shape = (hi - lo, num_kv_heads, head_dim)
    out = attention_kernel.attention(q[lo:hi], k[lo:hi].view(kv_shape), v[lo:hi].view(kv_shape), offsets, offsets,
                                     scale, causal=True)
    return out.view(hi - lo, -1)


def attend_chunks(q: torch.Tensor, chunks: list[tuple[int, int, int, torch.Tensor]], k_blocks: torch.Tensor,
                  v_blocks: torch.Tensor, scale: float) -> torch.Tensor:
    """Chunks after cached context, (first row, rows, context length, block table [blocks]) each: their rows of
    q [N, H, D] over their requests' blocks [num_blocks, block_size, Hkv, D] -> [sum of rows, H * D], in the
    order given."""
    num_kv_heads, head_dim = k_blocks.shape[2:]
    rows = [n for _, n, _, _ in chunks]
    contexts = [c for _, _, c, _ in chunks]
    qs = [q[lo:lo + n] for lo, n, _, _ in chunks]
    # whole blocks at a time, then each request's first `context` keys: one contiguous run per request
    ks = [k_blocks[table].view(-1, num_kv_heads, head_dim)[:c] for _, _, c, table in chunks]
    vs = [v_blocks[table].view(-1, num_kv_heads, head_dim)[:c] for _, _, c, table in chunks]
    one = len(chunks) == 1
    out = attention_kernel.attention(qs[0] if one else torch.cat(qs), ks[0] if one else torch.cat(ks),
                                     vs[0] if one else torch.cat(vs), _offsets(rows), _offsets(contexts), scale,
                                     causal=True)
    return out.view(sum(rows), -1)

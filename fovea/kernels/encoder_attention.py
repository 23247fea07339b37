"""fovea's attention kernel on AVX-512 BF16: bidirectional (encoders) or causal (prefill) attention over
variable-length segments.

Why: a ViT's attention (BLIP-2's ViT over 257 tokens, CLIP ViT-L/14-336's over 577) is ~10% of its FLOPs but ran
at ~15% of the GEMM rate in torch's SDPA on this class of machine (AMD Zen 4, 2 cores), so it took about as long
as all of a block's linear layers. This kernel (csrc/encoder_attention.cpp) is flash attention written for
VDPBF16PS: per (segment, kv head) it packs the keys into panels of 16 keys (pair-major, as the bfloat16 linear
kernel's weight panels) and the values into key pairs (prefetched: a head's rows lie a packed qkv row apart, and
unprefetched this packing was half of the kernel's time), then for each block of 12 query rows computes the
scores 12 x 32 at a time in float32 (each row's maximum on the way), an online softmax over blocks of 256 keys,
and P @ V into float32 accumulators, with no horizontal sum in the products and S, P and O in L1. Per core
(AMD Zen 4, 1 thread) 104-132 GFLOP/s where SDPA reached 54-59 at BLIP-2's and CLIP's shapes
(`benchmarks/vision_tower.py` measures both).

A decoder's prefill attention (causal, grouped-query) ran at 25-35 GFLOP/s per core in torch's flash SDPA at the
Qwen2.5-VL workload's prompt lengths (64-400 tokens, 14 q heads over 2 kv heads of 64), a quarter of the GEMMs'
rate; the same tiles serve it: `causal=True` aligns the mask bottom-right (query row i of a segment of n_q rows
over n_k keys sees keys j <= i + n_k - n_q, the rows being the last n_q positions: a prompt chunk after its cached
context), skips each query block's key tiles past its last row's last key (so causal work is about half) and masks
only the tiles on the diagonal.

API (general on purpose: vision encoders with several images per batch, windowed attention as Qwen2.5-VL's, and
every prefill of an engine step can call it alike): `attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal)`
with q [Nq, H, D] and k, v [Nk, Hkv, D] bfloat16 (any row and head strides, contiguous heads: views of a packed
qkv projection go in as they are), segment i being rows cu_seqlens_q[i]:cu_seqlens_q[i + 1] of q attending to rows
cu_seqlens_k[i]:cu_seqlens_k[i + 1] of k and v -> [Nq, H, D] contiguous (= [Nq, H * D] for the output projection).
D any even size (64, 80, 128 ...); Hkv divides H (grouped-query: kv head j serves q heads j * H/Hkv ..
(j + 1) * H/Hkv - 1, as torch's `enable_gqa`), each kv head's keys and values packed once for all of its q heads.
Work items are blocks of 12 query rows of one head, taken from a counter, so a segment's bits do not depend on
the batch it is in or on the number of threads.

Arithmetic, as torch's CPU flash attention does it for bfloat16: q . k products of bfloat16 pairs summed in
float32 (VDPBF16PS), times `scale` in float32, per row an online softmax (running max and sum over key blocks, the
output rescaled by exp(old max - new max)), the probabilities rounded to bfloat16 for P @ V (summed in float32),
the row's sum of the unrounded exps, and the output times 1 / sum, rounded once. What may differ from torch's:
the order of the float32 sums, the exp (Cephes' polynomial, ~1 ulp; torch's is its own vectorised one), its
argument (s * scale - max in one FMA where torch rounds s * scale first) and the key block boundaries (torch's depend on the sequence length): a few bfloat16 steps in some outputs, never more than
torch's own bfloat16 is from float32 (tests/kernels/test_encoder_attention.py measures both).

Runs where the bfloat16 linear kernel does (`fovea.kernels.status().bf16_linear`: AVX-512 BF16, extension built,
`cpu_kernels` not "off"); `supports(...)` says whether a call may use it, else callers run torch's SDPA.
"""
from __future__ import annotations

import torch

from fovea.kernels.ops import extension
from fovea.kernels.runtime import RUNTIME


def available() -> bool:
    """This kernel runs here (see the module docstring)."""
    if not RUNTIME.status().bf16_linear.is_active:
        return False
    return bool(extension().encoder_attention_compiled())


def supports(*tensors: torch.Tensor) -> bool:
    """q, k, v can go to this kernel: bfloat16 CPU tensors with an even last dimension, no autograd, kernel here."""
    for t in tensors:
        if not t.is_cpu or t.dtype != torch.bfloat16 or t.requires_grad or t.shape[-1] % 2:
            return False
    return available()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
              cu_seqlens_k: torch.Tensor | None, scale: float, causal: bool = False) -> torch.Tensor:
    """q [Nq, H, D], k, v [Nk, Hkv, D] bfloat16 (Hkv divides H); cu_seqlens_* [S + 1] int64 offsets (k's default:
    q's); scale > 0; causal: bottom-right (each segment at most as many queries as keys) -> [Nq, H, D]."""
    if not available():
        raise RuntimeError(f"fovea's AVX-512 BF16 encoder attention does not run here "
                           f"({RUNTIME.status().bf16_linear.describe()})")
    if not scale > 0:  # the kernel takes each row's max before scaling, which only a positive scale keeps in place
        raise ValueError(f"scale must be positive (it is head_dim ** -0.5 or similar); got {scale}")
    cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    return extension().encoder_attention(q, k, v, cu_seqlens_q, cu_k, scale, causal)


def uniform_segments(num_segments: int, length: int) -> torch.Tensor:
    """Offsets of `num_segments` runs of `length` rows: [0, length, 2 length, ...] int64."""
    return torch.arange(0, (num_segments + 1) * length, length, dtype=torch.int64)

"""A plain streaming read of a tensor's bytes, the way fovea's weight-streaming kernels read their weights: the
memory-read bound that single-stream decode is measured against (`benchmarks/bandwidth.py`).

Why not `torch.sum`: its loop converts and adds every element, and how fast it reads depends on the dtype, the
buffer's pages and torch's own split of the work; a decode step reads packed weights on 2 MiB pages, each thread
streaming one contiguous run (`RangeSplit` in csrc/common.h), its loads in address order. `read_bytes` does
exactly that and nothing else per 64-byte line than one AVX-512 load and a byte sum (csrc/memory_read.cpp;
scalar on CPUs without AVX-512 BW), so it is the read rate the kernels could reach, not a reduction's: without
`prefetch` as the bfloat16 kernel reads at 1-4 rows (the hardware prefetcher alone), with it as the int8 kernel
and the bfloat16 kernel's 5-12 row loop do (16 KB ahead into L2, `kWeightPrefetchBytes`). The byte sum it
returns lets a test check that every byte was read exactly once.
"""
from __future__ import annotations

import torch

from fovea.kernels.ops import _module

CHUNK_BYTES = 1 << 20
"""Bytes per work item: about the size of the bf16 kernel's panel group at one row (<= 16 panels of K = 896)."""


def read_bytes(t: torch.Tensor, prefetch: bool = True, chunk_bytes: int = CHUNK_BYTES, streams: int = 1) -> int:
    """Read every byte of `t` (contiguous, CPU) on torch's threads; returns the sum of its bytes as unsigned
    8-bit integers. `prefetch`: the kernels' software prefetch, else the hardware prefetcher alone. `streams`
    (1 to 64): each work item is read as that many equal sub-ranges, a 2 KB piece from each in turn, so one core
    walks several distant strips of memory at once (`benchmarks/read_patterns.py` measures which pays)."""
    return _module().read_bytes(t, prefetch, chunk_bytes, streams)

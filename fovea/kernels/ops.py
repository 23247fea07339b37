"""Typed wrappers of the fused CPU kernels and the paged decode attention kernel.

Why fused: in a decode step every op runs over a few dozen rows, so torch's per-op cost dominates; RMSNorm as
transformers writes it is seven ops, rotary five per tensor, a SwiGLU gate two. Each kernel here is one pass over
the rows and reproduces the torch formula's roundings op by op (`csrc/fused.cpp`):

- `rms_norm(x, weight, eps)`: y = R(R(x * rsqrt(mean(x^2) + eps)) * weight), statistics in float32, R the rounding
  to x's dtype (transformers' Qwen2RMSNorm). Only the mean's summation order can differ from torch's.
- `add_rms_norm_(x, residual, weight, eps)`: x = R(x + residual) in place (torch's add in x's dtype), then
  `rms_norm(x, weight, eps)` of the sum: a pre-norm decoder's residual add and the next norm in one pass (vLLM's
  `fused_add_rms_norm`). Its normed rows equal `rms_norm`'s of the same sum bit for bit (one row function).
- `write_kv_(k_cache, v_cache, slot_mapping, k, v)`: row n of k and v into slot `slot_mapping[n]` of each paged
  cache (`index_copy_` twice, in one call; every slot checked against the cache first).
- `rotary_(x, cos, sin, num_heads, head_dim)`: in place on the first `num_heads * head_dim` columns of each row
  (q and k heads of a packed qkv row; v untouched), the "rotate half" layout. With cos/sin in x's dtype every
  product and the sum are rounded to it, as `x * cos + rotate_half(x) * sin` in that dtype; with float32 cos/sin
  and a bfloat16 x the arithmetic is float32 and only the result is rounded, as
  `(x.float() * cos + rotate_half(x.float()) * sin).to(bfloat16)` (Qwen2.5-VL's vision tower).
- `silu_mul(gate_up)`: [N, 2I] -> [N, I], R(R(silu(gate)) * up) with gate, up the row's two halves (a SwiGLU MLP's
  packed gate/up projection). Its exp is a polynomial (`exp_approx` in csrc/common.h, about 1 ulp), not torch's,
  so float32 results may differ from torch's in the last bit, and bfloat16 ones rarely by one step.
- `first_argmax(values)`: [B, V] -> [B] int64, each row's first maximum (the first NaN if it has one), as
  `torch.argmax`; for the sampler's greedy rows. torch's `max` reads a bfloat16 [32, 151936] at ~1-2 GB/s (4.5 ms
  per decode step), this kernel in 0.6 ms.

And `paged_decode(...)` (`csrc/paged_attention.cpp`): decode attention reading every key and value once, where it
lies in the paged pool, a request and a run of its kv heads per work item (bfloat16 heads of 64 without GQA: scores
by AVX-512 BF16 dot products where the CPU has them, the float32 arithmetic summed in another order); gather +
SDPA reads and writes the context twice more (4x slower at 64 requests). `rotary_paged_decode(...)` (`csrc/decode_attention.cpp`) is `rotary_`,
`write_kv_` and `paged_decode` of a packed qkv in one call, for a decode-only step.

Why one call rather than three, and few ops between two linear layers at all: a decode step's linear layers
stream ~30 MB of weights per layer through the caches, after which the next Python or torch op finds its code
and data evicted. Measured (AMD EPYC, 1 thread, a 32 MB `sum` before each call): a bfloat16 `x + y` of 896
values takes ~40 us cold against ~2 warm, a `view` ~35, a call that does nothing ~6, `can_fuse` ~30; in a
single-stream decode the gaps between linear layers added up to ~330 us per layer.

Call `can_fuse(...)` / `is_available()` first: they are False under `cpu_kernels="off"` or when the extension did
not build, and the caller then runs the torch formula. The kernels raise RuntimeError naming the bad argument.
"""
from __future__ import annotations

import torch

from fovea.kernels.runtime import RUNTIME, UNRESOLVED

_FUSED_DTYPES = (torch.float32, torch.bfloat16)


def extension():
    """The compiled module, or None (torch ops run instead). Builds it on first use."""
    extension = RUNTIME.extension
    return extension if extension is not UNRESOLVED else RUNTIME.resolve()


def is_available() -> bool:
    """fovea's C++ kernels run in this process (mode not "off", extension built)."""
    return extension() is not None


def can_fuse(*tensors: torch.Tensor) -> bool:
    """The fused kernels apply: CPU float32/bfloat16 tensors, no autograd, and the extension built."""
    for t in tensors:
        # `is_cpu`, not `device.type`: it builds no device object (this runs several times per layer and step)
        if not t.is_cpu or t.dtype not in _FUSED_DTYPES or t.requires_grad:
            return False
    return extension() is not None


def _module():
    module = extension()
    if module is None:
        raise RuntimeError(f"fovea's C++ kernels do not run here ({RUNTIME.status().fused.describe()}); "
                           "check fovea.kernels.can_fuse / is_available before calling them")
    return module


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [N, D] (rows contiguous), weight [D] in x's dtype -> [N, D]."""
    return _module().rms_norm(x, weight, eps)


def add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x, residual [N, D] (rows contiguous), weight [D], one dtype: x += residual in place; returns rms_norm(x)."""
    return _module().add_rms_norm_(x, residual, weight, eps)


def write_kv_(k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
    """k, v [N, kv_heads * head_dim] (rows contiguous) into the caches [slots, kv_heads, head_dim] (contiguous,
    the same dtype) at slot_mapping [N] int64."""
    _module().write_kv_(k_cache, v_cache, slot_mapping, k, v)


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, head_dim: int) -> None:
    """Rotate the first `num_heads` heads of each row of x [N, width] in place; cos, sin [N, head_dim]."""
    _module().rotary_(x, cos, sin, num_heads, head_dim)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [N, 2I] (rows contiguous) -> silu(gate) * up [N, I]."""
    return _module().silu_mul(gate_up)


def first_argmax(values: torch.Tensor) -> torch.Tensor:
    """values [B, V] (rows contiguous, V > 0) -> [B] int64, as values.argmax(-1)."""
    return _module().first_argmax(values)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, block_size: int,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per request against its paged context.

    q [B, H, D]; k_cache, v_cache [slots, Hkv, D]; block_table [B, max_blocks] long; context_lens [B] long
    -> [B, H, D] in the cache's dtype. Token t of request b lives in slot
    block_table[b, t // block_size] * block_size + t % block_size. `bias` [B, H, >= max context] (T5's relative
    position scores) is added to the scaled scores, in float32.
    """
    return _module().paged_decode(q, k_cache, v_cache, block_table, context_lens, scale, block_size, bias)


def rotary_paged_decode(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_table: torch.Tensor,
                        context_lens: torch.Tensor, num_heads: int, scale: float, block_size: int) -> torch.Tensor:
    """A decode-only step's attention from the packed projection, one query row per request: qkv [B, (num_heads +
    2 kv_heads) * head_dim] (rows contiguous; its q and k heads are rotated in place), cos, sin [B, head_dim];
    k and v written to `slot_mapping` [B] of the caches [slots, kv_heads, head_dim] (qkv's dtype); then
    `paged_decode` of q -> [B, num_heads * head_dim]."""
    return _module().rotary_paged_decode(qkv, cos, sin, k_cache, v_cache, slot_mapping, block_table, context_lens,
                                         num_heads, scale, block_size)

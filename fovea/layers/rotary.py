"""Rotary position embeddings: 1-D RoPE (Su et al. 2021), Qwen2-VL's multimodal M-RoPE, and 2-D vision RoPE.

All three rotate pairs (i, i + D/2) of each head by angle `position * inv_freq[i]` (the "rotate half" layout
of transformers' checkpoints). They differ only in which position drives which frequency:

- 1-D: one position per token drives every frequency.
- M-RoPE: three positions per token (temporal, height, width); the D/2 frequencies are cut into
  `mrope_section` = [s_t, s_h, s_w] consecutive runs, run k driven by position row k.
- 2-D vision: a (row, column) per patch; the first D/4 frequencies are driven by the row, the next D/4 by the
  column, each with frequencies over a D/2-wide base.

cos/sin are computed in float32 (as transformers does) once per forward and shared by every layer.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fovea import kernels


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H * D] or [N, H, D]; cos, sin [N, D] in x's dtype -> rotated x, same shape."""
    shape = x.shape
    x = x.view(cos.shape[0], -1, cos.shape[-1])  # (N, H, D)
    out = x * cos[:, None] + rotate_half(x) * sin[:, None]
    return out.view(shape)


def apply_rotary_packed(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rotate the first `num_heads` heads of each packed row (q heads, then k heads; v after them is left
    alone). qkv [N, width]; cos, sin [N, head_dim]. Returns qkv rotated, in place when the fused CPU kernel
    runs. cos/sin in qkv's dtype: every op rounds to it (`apply_rotary`); float32 cos/sin with a bfloat16
    qkv: float32 arithmetic, one rounding at the end (as transformers' vision towers).
    """
    head_dim = cos.shape[-1]
    if qkv.dim() == 2 and qkv.stride(1) == 1 and kernels.can_fuse(qkv, cos, sin) and cos.stride(1) == 1:
        kernels.rotary_(qkv, cos, sin, num_heads, head_dim)
        return qkv
    width = num_heads * head_dim
    rotated = qkv[:, :width]
    if cos.dtype != qkv.dtype:
        rotated = apply_rotary(rotated.to(cos.dtype), cos, sin).to(qkv.dtype)
    else:
        rotated = apply_rotary(rotated, cos, sin)
    return torch.cat([rotated, qkv[:, width:]], dim=1)


def inverse_frequencies(dim: int, theta: float) -> torch.Tensor:
    """[dim / 2] float32: theta ** (-2i / dim)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def rope_parameters(config: Any) -> dict[str, Any]:
    """The config's RoPE settings as transformers 5 stores them (`rope_parameters`), older names accepted.

    Only plain RoPE is implemented (rope_type "default"; Qwen2-VL's "mrope" is the same with sections);
    scaled variants (linear, dynamic, yarn, ...) are an error rather than silently different positions.
    """
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ValueError(f"rope_type {rope_type!r} is not supported by fovea; supported: 'default' (and 'mrope')")
    return params


class RotaryEmbedding(nn.Module):
    """cos/sin for 1-D positions [N], or for M-RoPE positions [3, N] when `mrope_section` is given."""

    def __init__(self, head_dim: int, theta: float, mrope_section: Sequence[int] | None = None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary head_dim must be even, got {head_dim}")
        self.head_dim = head_dim
        # a plain attribute, not a buffer: a model built or cast in bfloat16 must keep float32 frequencies
        self.inv_freq = inverse_frequencies(head_dim, theta)
        self.mrope_section = list(mrope_section) if mrope_section is not None else None
        if self.mrope_section is not None:
            if len(self.mrope_section) != 3 or sum(self.mrope_section) != head_dim // 2:
                raise ValueError(f"mrope_section must be 3 sizes summing to head_dim / 2 = {head_dim // 2}, "
                                 f"got {self.mrope_section}")
            # which position row (t, h, w) drives each of the head_dim / 2 frequencies
            rows = torch.repeat_interleave(torch.arange(3), torch.tensor(self.mrope_section))
            self.freq_rows = rows

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N] (or [3, N] for M-RoPE) -> cos, sin [N, head_dim] in `dtype`."""
        freqs = positions[..., None].float() * self.inv_freq  # (N, D/2) or (3, N, D/2)
        if self.mrope_section is not None:
            if positions.dim() != 2 or positions.shape[0] != 3:
                raise ValueError(f"M-RoPE positions must be [3, N], got {list(positions.shape)}")
            # frequency i takes its angle from position row freq_rows[i]
            freqs = freqs.gather(0, self.freq_rows.view(1, 1, -1).expand(1, freqs.shape[1], -1))[0]
        elif positions.dim() != 1:
            raise ValueError(f"positions must be [N], got {list(positions.shape)}")
        emb = torch.cat((freqs, freqs), dim=-1)  # (N, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class VisionRotaryEmbedding(nn.Module):
    """2-D RoPE over a patch grid: cos/sin [N, head_dim] float32 from (row, column) pairs [N, 2]."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D rotary head_dim must be a multiple of 4, got {head_dim}")
        self.inv_freq = inverse_frequencies(head_dim // 2, theta)  # (D/4,), float32 (see RotaryEmbedding)

    def forward(self, row_col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = (row_col[..., None].float() * self.inv_freq).flatten(1)  # (N, D/2): D/4 row angles, D/4 column
        emb = torch.cat((freqs, freqs), dim=-1)  # (N, D)
        return emb.cos(), emb.sin()

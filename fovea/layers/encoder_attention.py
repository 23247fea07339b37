"""Bidirectional (encoder) attention: the SDPA call, head reshapes and segment handling of every encoder.

Projections stay in the model files (BLIP's fused `qkv` with q/v bias, the Q-Former's separate
`query`/`key`/`value`, Qwen2.5-VL's packed qkv with rotary); the attention math after them lives here:

- `encoder_attention`: a batch of sequences [B, T, H * hs], self- or cross-attention (keys from another
  input), optionally under a mask (padding, or a full pattern such as BLIP-2's ITG mask) and with dropout
  on the attention probabilities when training;
- `PackedSegments`: one packed sequence [N, H, hs] cut into disjoint runs (Qwen2.5-VL's windows and frames)
  that each attend only to themselves.

Both feed torch's SDPA 4-D inputs: its CPU flash kernel takes only batched inputs (3-D ones run ~10x slower).
Unmasked bfloat16 attention at inference (a ViT's blocks, Qwen2.5-VL's windows) runs fovea's AVX-512 BF16
kernel instead where it runs (`fovea.kernels.encoder_attention`: ~2x SDPA's speed at BLIP-2's and CLIP's
shapes, SDPA's bfloat16 arithmetic up to summation order), every sequence of the batch in one call.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fovea.kernels import encoder_attention as attention_kernel


def attend_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
                 dropout_p: float = 0.0) -> torch.Tensor:
    """The one core: q [B, Tq, H, hs] over k, v [B, Tk, H, hs] -> [B, Tq, H, hs], no causal order.

    mask: bool "may attend", broadcastable to (B, H, Tq, Tk) (see `as_sdpa_mask`); None attends everywhere.
    """
    if (mask is None and dropout_p == 0.0 and scale > 0 and q.shape[2] == k.shape[2]
            and attention_kernel.supports(q, k, v)):
        batch, rows, heads, head_dim = q.shape
        keys = k.shape[1]
        # (B, T, H, hs) views of a packed qkv flatten to (B * T, H, hs) views: nothing is copied
        out = attention_kernel.attention(
            q.reshape(batch * rows, heads, head_dim), k.reshape(batch * keys, heads, head_dim),
            v.reshape(batch * keys, heads, head_dim), attention_kernel.uniform_segments(batch, rows),
            attention_kernel.uniform_segments(batch, keys), scale)
        return out.view(batch, rows, heads, head_dim)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         dropout_p=dropout_p, scale=scale)  # (B, H, Tq, hs)
    return out.transpose(1, 2)


def encoder_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, scale: float,
                      mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """q [B, Tq, H * hs] attends to k, v [B, Tk, H * hs] -> [B, Tq, H * hs].

    Self-attention passes the same input's projections as q, k, v; cross-attention takes k, v from another
    input (Tk may differ from Tq). Views are fine: heads are split by `view`, never copied.
    """
    batch, rows, width = q.shape
    head_dim = width // num_heads
    out = attend_heads(q.view(batch, rows, num_heads, head_dim), k.view(batch, -1, num_heads, head_dim),
                       v.view(batch, -1, num_heads, head_dim), scale, mask, dropout_p)
    return out.reshape(batch, rows, width)


def as_sdpa_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A boolean "may attend" mask for SDPA, broadcastable to (B, heads, rows, keys).

    (B, keys) marks real keys (1) and padding (0), the same for every row; (B, rows, keys) is a full pattern
    such as `fovea.training.losses.itg_attention_mask`; None attends everywhere.
    """
    if mask is None:
        return None
    if mask.dim() == 2:
        return mask.bool()[:, None, None, :]
    if mask.dim() == 3:
        return mask.bool()[:, None]
    raise ValueError(f"attention mask must be (B, keys) or (B, rows, keys); got {tuple(mask.shape)}")


class PackedSegments:
    """Disjoint runs of a packed sequence, each attending only to itself.

    Runs of equal length are batched into one SDPA call (windows mostly share a length), so there is neither
    a mask nor a Python loop per window. `groups` holds one [num_runs, length] index tensor per length, or
    (start, runs, length) when those runs follow one another (a slice of the sequence: no gather).
    """

    def __init__(self, lengths: Sequence[int]):
        starts: dict[int, list[int]] = {}
        offset = 0
        for n in lengths:
            if n:
                starts.setdefault(n, []).append(offset)
            offset += n
        self.num_rows = offset
        self.groups: list[torch.Tensor | tuple[int, int, int]] = []
        for n, s in starts.items():
            is_slice = s == list(range(s[0], s[0] + n * len(s), n))
            self.groups.append((s[0], len(s), n) if is_slice else torch.tensor(s)[:, None] + torch.arange(n))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        # q, k, v [N, H, hs] -> [N, H, hs]
        if len(self.groups) == 1 and isinstance(self.groups[0], tuple) and self.groups[0][1] == 1:
            return attend_heads(q[None], k[None], v[None], scale)[0]  # one run over everything: no copy at all
        out = torch.empty_like(q)
        for group in self.groups:
            if isinstance(group, tuple):
                start, runs, length = group
                qg, kg, vg = (t[start:start + runs * length].unflatten(0, (runs, length)) for t in (q, k, v))
                out[start:start + runs * length] = attend_heads(qg, kg, vg, scale).flatten(0, 1)  # (runs*L, H, hs)
                continue
            out[group] = attend_heads(q[group], k[group], v[group], scale)  # (runs, L, H, hs)
        return out

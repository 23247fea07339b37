"""Rotary position embeddings: 1-D RoPE (Su et al. 2021), Qwen2-VL's multimodal M-RoPE, and 2-D vision RoPE.

All three rotate pairs (i, i + D/2) of each head by angle `position * inv_freq[i]` (the "rotate half" layout
of transformers' checkpoints). They differ only in which position drives which frequency:

- 1-D: one position per token drives every frequency.
- M-RoPE: three positions per token (temporal, height, width); the D/2 frequencies are cut into
  `mrope_section` = [s_t, s_h, s_w] consecutive runs, run k driven by position row k.
- 2-D vision: a (row, column) per patch; the first D/4 frequencies are driven by the row, the next D/4 by the
  column, each with frequencies over a D/2-wide base.

1-D RoPE's frequencies may be scaled as Llama-family configs say (`build_rotary_embedding`): "linear" (all divided
by the factor), "llama3" (Llama 3.1's bands) or "dynamic" (NTK: the base grows with the sequence length past
max_position_embeddings, per request; `DynamicNTKRotaryEmbedding`), each bit-equal to transformers' frequencies.

cos/sin are computed in float32 (as transformers does) once per forward and shared by every layer.
"""
from __future__ import annotations

import math
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


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate only the first cos.shape[-1] features of each head (partial rotary, Persimmon's
    `partial_rotary_factor`); the rest pass through. x [N, H, D]; cos, sin [N, R] with R <= D, in x's dtype."""
    rotary_dim = cos.shape[-1]
    rotated = x[..., :rotary_dim] * cos[:, None] + rotate_half(x[..., :rotary_dim]) * sin[:, None]
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


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


def rope_parameters(config: Any, supported: Sequence[str] = ("default", "mrope")) -> dict[str, Any]:
    """The config's RoPE settings as transformers 5 stores them (`rope_parameters`), older names accepted
    (`rope_scaling` with `type`, a top-level `rope_theta`); `rope_type` is always set in the result.

    A rope_type outside `supported` is an error rather than silently different positions: Qwen2-VL's M-RoPE
    takes only plain frequencies; Llama's family also takes "linear", "dynamic" and "llama3"
    (`SCALED_ROPE_TYPES`, built by `build_rotary_embedding`).
    """
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in supported:
        raise ValueError(f"rope_type {rope_type!r} is not supported by fovea for {type(config).__name__}; "
                         f"supported: {', '.join(repr(t) for t in supported)}")
    params["rope_type"] = rope_type
    return params


SCALED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def _require(params: dict[str, Any], *names: str) -> list[Any]:
    missing = [n for n in names if params.get(n) is None]
    if missing:
        raise ValueError(f"rope_type {params['rope_type']!r} needs {missing} in rope_parameters, got {params}")
    return [params[n] for n in names]


def llama3_inverse_frequencies(dim: int, theta: float, factor: float, low_freq_factor: float,
                               high_freq_factor: float, original_max_position_embeddings: int) -> torch.Tensor:
    """Llama 3.1's frequencies: wavelengths longer than the original context / low_freq_factor slowed down by
    `factor`, shorter than it / high_freq_factor kept, the band between blended smoothly (transformers' float32
    ops in its order, so the result is bit-equal)."""
    inv_freq = inverse_frequencies(dim, theta)
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def dynamic_ntk_inverse_frequencies(dim: int, theta: float, factor: float, max_position_embeddings: int,
                                    seq_len: int) -> torch.Tensor:
    """Dynamic NTK frequencies for a sequence of `seq_len` tokens: the base grows with the length past
    `max_position_embeddings` (plain RoPE up to it). Computed with transformers' tensor ops (an int64 length,
    float32 arithmetic), so the result is bit-equal to its `_compute_dynamic_ntk_parameters`."""
    length = torch.maximum(torch.tensor(seq_len), torch.tensor(max_position_embeddings))
    base = theta * ((factor * length / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


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


class DynamicNTKRotaryEmbedding(RotaryEmbedding):
    """Dynamic NTK RoPE as transformers runs it: the frequencies of a forward pass follow its sequence length
    (max position + 1), plain up to `max_position_embeddings` and with a larger base beyond.

    In fovea's flat batch each request has its own length: a token takes the frequencies of its request's
    context length in this step (`AttentionMetadata`), which is transformers' `max(position_ids) + 1` for that
    request alone. Keys are cached rotated, so, as in transformers, a token keeps the rotation of the step that
    computed it: prefill chunked, recomputed after preemption or shared through the prefix cache past
    `max_position_embeddings`, it can differ from transformers' one-pass prefill (exact below that length).
    """

    def __init__(self, head_dim: int, theta: float, factor: float, max_position_embeddings: int):
        super().__init__(head_dim, theta)
        self.theta, self.factor, self.max_position_embeddings = theta, factor, max_position_embeddings
        self._by_length: dict[int, torch.Tensor] = {}  # seq_len -> inv_freq, memoised (a handful per step)

    def _inv_freq(self, seq_len: int) -> torch.Tensor:
        if seq_len <= self.max_position_embeddings:
            return self.inv_freq
        if seq_len not in self._by_length:
            if len(self._by_length) > 4096:
                self._by_length.clear()
            self._by_length[seq_len] = dynamic_ntk_inverse_frequencies(
                self.head_dim, self.theta, self.factor, self.max_position_embeddings, seq_len)
        return self._by_length[seq_len]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() != 1:
            raise ValueError(f"positions must be [N], got {list(positions.shape)}")
        seq_lens = _sequence_lengths(positions)  # [N]: each token's request context length this step
        if positions.numel() == 0 or int(seq_lens.max()) <= self.max_position_embeddings:
            return super().forward(positions, dtype)
        lengths, which = torch.unique(seq_lens, return_inverse=True)
        inv_freq = torch.stack([self._inv_freq(int(n)) for n in lengths])[which]  # (N, D/2)
        freqs = positions[:, None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _sequence_lengths(positions: torch.Tensor) -> torch.Tensor:
    """[N] context length of each token's request in this step (max position + 1 of its request): from the
    step's paged attention metadata; outside the engine (one sequence, no cache) the largest position + 1."""
    from fovea.layers.attention import AttentionMetadata, get_attention_metadata

    meta = get_attention_metadata()
    if not isinstance(meta, AttentionMetadata):
        return (positions.max() + 1).expand(positions.shape[0])
    seq_lens = torch.empty(positions.shape[0], dtype=torch.long)
    for group in meta.groups:
        max_q = group.q_index.shape[1]
        seq_lens[group.token_index] = group.context_lens[group.out_index // max_q]
    return seq_lens


def context_scaling_factor(config: Any) -> float:
    """How far past `max_position_embeddings` a config's RoPE stretches the context, as vLLM reads it: the
    `factor` of "linear" and "dynamic" scaling (llama3's configs already state the longer length), else 1."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    return float(params.get("factor") or 1.0) if rope_type in ("linear", "dynamic") else 1.0


def build_rotary_embedding(config: Any, head_dim: int) -> RotaryEmbedding:
    """1-D RoPE for a Llama-family config: rope_type "default", "linear" (frequencies / factor), "llama3"
    (Llama 3.1's banded scaling) or "dynamic" (NTK, per sequence length); anything else is a ValueError."""
    params = rope_parameters(config, SCALED_ROPE_TYPES)
    theta, rope_type = params["rope_theta"], params["rope_type"]
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor={params['partial_rotary_factor']} is not supported for "
                         f"{type(config).__name__}; fovea rotates whole heads")
    rotary = RotaryEmbedding(head_dim, theta)
    if rope_type == "linear":
        (factor,) = _require(params, "factor")
        rotary.inv_freq = inverse_frequencies(head_dim, theta) / factor
    elif rope_type == "llama3":
        factor, low, high, original = _require(params, "factor", "low_freq_factor", "high_freq_factor",
                                               "original_max_position_embeddings")
        rotary.inv_freq = llama3_inverse_frequencies(head_dim, theta, factor, low, high, original)
    elif rope_type == "dynamic":
        (factor,) = _require(params, "factor")
        return DynamicNTKRotaryEmbedding(head_dim, theta, factor, config.max_position_embeddings)
    return rotary

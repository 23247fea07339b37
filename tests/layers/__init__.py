import torch


def causal_attention_float64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of one sequence written out in float64, the layers' oracle.
    q [T, H, D], k/v [T, KV, D] (H a multiple of KV: grouped-query) -> [T, H, D]; scale D**-0.5."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    k = k.double().repeat_interleave(num_heads // k.shape[1], dim=1)
    v = v.double().repeat_interleave(num_heads // v.shape[1], dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * head_dim**-0.5
    scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)

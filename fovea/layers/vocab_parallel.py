"""The token table and the output projection split over the vocabulary (tensor parallelism).

Rank r of tp holds the vocabulary rows [r * per_rank, (r+1) * per_rank), per_rank = ceil(vocab / tp); the last
rank's rows past the vocabulary are padding, zero-filled at load.

- `VocabParallelEmbedding`: each rank looks up the ids in its range (the others read row 0 and are zeroed),
  and one `tp_all_reduce` sums the ranks' rows: every rank ends with the whole [N, dim] embedding.
- `ParallelLMHead`: each rank computes the logits of its vocabulary rows, [n, per_rank]; `tp_all_gather` puts
  them side by side and the padding columns are cut: every rank ends with the whole [n, vocab] logits (the
  sampler and logprobs see what one process computes).

A tied `lm_head` holds the embedding's parameter: the same rows on the same rank, loaded once through the
embedding's loader. At TP=1 both are the plain layers (`nn.Embedding`'s lookup, the linear method's output):
no padding, no loader, no collective.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fovea.distributed import parallel_state as ps
from fovea.layers.linear import LinearBase, copy_checked, set_weight_loader


@dataclass(frozen=True, slots=True)
class VocabShard:
    vocab_size: int
    tp_size: int
    tp_rank: int

    @staticmethod
    def for_this_rank(vocab_size: int) -> VocabShard:
        return VocabShard(vocab_size, ps.tp_size(), ps.tp_rank())

    @property
    def rows_per_rank(self) -> int:
        return -(-self.vocab_size // self.tp_size)

    @property
    def start(self) -> int:
        return self.tp_rank * self.rows_per_rank

    @property
    def num_real_rows(self) -> int:
        """This rank's rows that are vocabulary (the rest up to `rows_per_rank` are padding)."""
        return max(0, min(self.vocab_size - self.start, self.rows_per_rank))

    def load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None) -> None:
        """Copy this rank's rows of the checkpoint's [vocab, dim] table, zeros for the padding rows."""
        if shard_id is not None:
            raise ValueError(f"parameter is not packed, but got shard {shard_id!r}")
        if loaded.dim() != 2 or loaded.shape[0] != self.vocab_size:
            raise ValueError(f"shape {tuple(loaded.shape)}: expected {self.vocab_size} vocabulary rows before the "
                             f"tensor-parallel split")
        rows = self.num_real_rows
        copy_checked(param.data[:rows], loaded.narrow(0, self.start, rows))
        with torch.no_grad():
            param.data[rows:].zero_()


class VocabParallelEmbedding(nn.Embedding):
    """nn.Embedding(vocab_size, dim) whose rows are split over the tensor-parallel ranks; `weight` is this
    rank's [rows_per_rank, dim] and `vocab_size` the whole vocabulary."""

    def __init__(self, vocab_size: int, embedding_dim: int, dtype: torch.dtype | None = None):
        self.shard = VocabShard.for_this_rank(vocab_size)
        super().__init__(self.shard.rows_per_rank, embedding_dim, dtype=dtype)
        self.vocab_size = vocab_size
        if self.shard.tp_size > 1:
            set_weight_loader(self.weight, self.shard.load, ())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.shard.tp_size == 1:
            return super().forward(input_ids)
        local = input_ids - self.shard.start
        is_here = (local >= 0) & (local < self.shard.num_real_rows)
        rows = F.embedding(torch.where(is_here, local, 0), self.weight)  # [..., dim]
        rows.masked_fill_(~is_here.unsqueeze(-1), 0)
        return ps.tp_all_reduce(rows)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.shard.tp_size > 1:
            text += f", vocab_size={self.vocab_size}, tp={self.shard.tp_rank}/{self.shard.tp_size}"
        return text


class ParallelLMHead(LinearBase):
    """hidden [n, in_features] -> logits [n, vocab_size], each rank computing its vocabulary rows."""

    def __init__(self, in_features: int, vocab_size: int, bias: bool = False, dtype: torch.dtype | None = None):
        self.shard = VocabShard.for_this_rank(vocab_size)
        super().__init__(in_features, self.shard.rows_per_rank, bias=bias, dtype=dtype)
        self.vocab_size = vocab_size
        if self.shard.tp_size > 1:
            if bias:  # no checkpoint of the families served here has one; its padding would need its own loader
                raise ValueError("a tensor-parallel lm_head with a bias is not supported")
            set_weight_loader(self.weight, self.shard.load, ())

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        """Share the token table (the same vocabulary rows on this rank, loaded once by the embedding)."""
        if embedding.shard != self.shard:
            raise ValueError(f"cannot tie an lm_head over {self.shard} to an embedding over {embedding.shard}")
        self.weight = embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.method.apply(self, x)  # [n, rows_per_rank]
        if self.shard.tp_size == 1:
            return logits
        return ps.tp_all_gather(logits, dim=-1)[..., :self.vocab_size].contiguous()

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.shard.tp_size > 1:
            text += f", vocab_size={self.vocab_size}, tp={self.shard.tp_rank}/{self.shard.tp_size}"
        return text

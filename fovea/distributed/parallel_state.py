"""Which tensor-/pipeline-parallel rank this process is, and its process groups.

The world is `tp_size * pp_size` worker processes laid out as vLLM lays them out: global rank
`pp_rank * tp_size + tp_rank`, so the ranks of one pipeline stage are consecutive (they all-reduce with each
other on every layer) and the ranks of one tensor shard across stages form a pipeline group (they pass
activations along it).

A process that never called `init_parallel` (the in-process executor, training, tests) is rank 0 of a world of
one: every getter answers as for TP=1, PP=1 and the collectives are identities, so model code calls them
unconditionally.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelLayout:
    tp_size: int = 1
    pp_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        for name in ("tp_size", "pp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} is outside a world of {self.world_size} (tp {self.tp_size} x pp "
                             f"{self.pp_size})")

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    def tp_ranks(self, pp_rank: int) -> list[int]:
        """Global ranks of the tensor-parallel group of stage `pp_rank`."""
        return [pp_rank * self.tp_size + t for t in range(self.tp_size)]

    def pp_ranks(self, tp_rank: int) -> list[int]:
        """Global ranks of the pipeline of tensor shard `tp_rank`, first stage first."""
        return [p * self.tp_size + tp_rank for p in range(self.pp_size)]


@dataclass
class _State:
    layout: ParallelLayout
    tp_group: dist.ProcessGroup | None
    pp_group: dist.ProcessGroup | None


_state = _State(ParallelLayout(), None, None)


def init_parallel(layout: ParallelLayout, init_method: str, backend: str = "gloo", timeout_s: float = 300.0) -> None:
    """Join the world (every rank calls this with its own `layout.rank`) and build the TP and PP groups.

    `new_group` is collective: every rank creates every group in the same order, keeping only its own."""
    global _state
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process")
    dist.init_process_group(backend=backend, init_method=init_method, world_size=layout.world_size,
                            rank=layout.rank, timeout=timedelta(seconds=timeout_s))
    tp_group = pp_group = None
    for pp_rank in range(layout.pp_size):
        group = dist.new_group(layout.tp_ranks(pp_rank))
        if pp_rank == layout.pp_rank:
            tp_group = group
    for tp_rank in range(layout.tp_size):
        group = dist.new_group(layout.pp_ranks(tp_rank))
        if tp_rank == layout.tp_rank:
            pp_group = group
    _state = _State(layout, tp_group, pp_group)


def destroy_parallel() -> None:
    global _state
    if dist.is_initialized():
        dist.destroy_process_group()
    _state = _State(ParallelLayout(), None, None)


def layout() -> ParallelLayout:
    return _state.layout


def tp_rank() -> int:
    return _state.layout.tp_rank


def tp_size() -> int:
    return _state.layout.tp_size


def pp_rank() -> int:
    return _state.layout.pp_rank


def pp_size() -> int:
    return _state.layout.pp_size


def is_first_stage() -> bool:
    return _state.layout.pp_rank == 0


def is_last_stage() -> bool:
    return _state.layout.pp_rank == _state.layout.pp_size - 1


def tp_group() -> dist.ProcessGroup | None:
    return _state.tp_group


def pp_group() -> dist.ProcessGroup | None:
    return _state.pp_group


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the tensor-parallel group (in place when TP > 1; returned either way)."""
    if _state.layout.tp_size == 1:
        return x
    dist.all_reduce(x, group=_state.tp_group)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`, rank 0's first."""
    if _state.layout.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_state.layout.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=_state.tp_group)
    return torch.cat(parts, dim=dim)

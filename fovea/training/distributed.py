"""torch.distributed helpers: set-up from torchrun's environment, and the gathers the stage-1 losses need.

A single process started without torchrun needs nothing: `init_distributed()` returns world size 1 and
every helper here degrades to the identity, so the same training code runs in both.

Why `all_gather_with_grad` gives N processes the gradients of one process on the global batch
--------------------------------------------------------------------------------------------------
Rank r holds the local slice x_r (b rows) of the global batch X = cat(x_0, ..., x_{N-1}) and computes a
local loss L_r = (1/b) * sum of its b per-example losses, where each per-example loss may look at every row
of X (the gathered negatives). DDP then *averages* parameter gradients over ranks. Rank s's parameters
touch the losses only through x_s, so the gradient it needs for x_s is d(sum_r L_r)/dx_s = sum_r (dL_r/dX)[s]:
the backward below all-reduces (sums) the gradient of the gathered tensor and keeps slice s. Summing the
resulting parameter gradients over ranks gives d(sum_r L_r)/dtheta, and DDP's division by N turns it into
d((1/N) sum_r L_r)/dtheta = d(L_global)/dtheta, because (1/N) sum_r L_r is the mean over all B = N*b
examples. Hence: all-reduce with SUM here, DDP's mean outside, equal local batch sizes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class DistState:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None
    """"gloo" or "nccl"; None when no process group was set up (a single process without torchrun)."""

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistState:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT), or do nothing for a plain single process.

    backend: None picks nccl when CUDA is available (and binds this process to GPU LOCAL_RANK), else gloo.
    Calling it again after the group exists returns the same state.
    """
    if dist.is_available() and dist.is_initialized():
        return _current_state()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return DistState(rank=0, world_size=1, local_rank=0, device=device, backend=None)
    if not dist.is_available():
        raise RuntimeError("torch was built without torch.distributed; cannot join the torchrun process group")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend={backend!r}: choose 'gloo' (CPU) or 'nccl' (GPU)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return _current_state()


def _current_state() -> DistState:
    backend = dist.get_backend()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return DistState(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                     device=device, backend=backend)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group. Drop DDP-wrapped models first: they hold the group, and a group freed only
    at interpreter exit can abort the process. The barrier keeps any rank from tearing its connections
    down while another is still in a collective."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        world_size = dist.get_world_size()
        ctx.rank, ctx.num_local = dist.get_rank(), local.shape[0]
        parts = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts, dim=0)  # (world_size * b, ...)

    @staticmethod
    def backward(ctx, grad_gathered: torch.Tensor) -> torch.Tensor:
        grad = grad_gathered.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # sum over ranks' losses; see the module docstring
        start = ctx.rank * ctx.num_local
        return grad[start:start + ctx.num_local]


def all_gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `local` along dim 0 (rank order), keeping the graph to this rank's slice.

    Every rank must pass a tensor of the same shape and use the result in its loss (the backward is a
    collective: a rank that skips it leaves the others waiting). Without a process group (or with one
    process) this is the identity.
    """
    if not is_distributed():
        return local
    return _AllGatherWithGrad.apply(local)


@torch.no_grad()
def concat_all_gather(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `local` along dim 0 (rank order), detached: for ids, masks, token ids and
    for similarity rows that only choose negatives."""
    if not is_distributed():
        return local.detach()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts, dim=0)

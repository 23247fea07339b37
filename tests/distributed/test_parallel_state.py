"""The rank layout, and the groups and collectives in real processes (torch.multiprocessing, gloo)."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from fovea.distributed import parallel_state as ps
from fovea.distributed.parallel_state import ParallelLayout


def test_layout_puts_one_stage_on_consecutive_ranks():
    layout = ParallelLayout(tp_size=2, pp_size=3, rank=5)
    assert (layout.tp_rank, layout.pp_rank, layout.world_size) == (1, 2, 6)
    assert layout.tp_ranks(1) == [2, 3]
    assert layout.pp_ranks(0) == [0, 2, 4]


@pytest.mark.parametrize("kwargs, message", [
    (dict(tp_size=0), "tp_size=0 must be a positive integer"),
    (dict(pp_size=2, rank=2), "rank=2 is outside a world of 2"),
])
def test_layout_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelLayout(**kwargs)


def test_single_process_collectives_are_identities():
    x = torch.arange(4.0)
    assert ps.tp_all_reduce(x) is x
    assert ps.tp_all_gather(x) is x
    assert (ps.tp_size(), ps.pp_size(), ps.is_first_stage(), ps.is_last_stage()) == (1, 1, True, True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, results) -> None:
    ps.init_parallel(ParallelLayout(tp_size=2, pp_size=2, rank=rank), f"tcp://127.0.0.1:{port}")
    try:
        summed = ps.tp_all_reduce(torch.tensor([float(rank)]))
        gathered = ps.tp_all_gather(torch.tensor([[float(rank)]]), dim=1)
        results[rank] = (ps.tp_rank(), ps.pp_rank(), summed.tolist(), gathered.tolist(), ps.is_last_stage())
    finally:
        ps.destroy_parallel()


def test_groups_in_four_processes():
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), results), nprocs=4, join=True)
    # stage 0 = ranks 0, 1; stage 1 = ranks 2, 3: each TP group sums and gathers within its stage only
    assert dict(results) == {
        0: (0, 0, [1.0], [[0.0, 1.0]], False),
        1: (1, 0, [1.0], [[0.0, 1.0]], False),
        2: (0, 1, [5.0], [[2.0, 3.0]], True),
        3: (1, 1, [5.0], [[2.0, 3.0]], True),
    }

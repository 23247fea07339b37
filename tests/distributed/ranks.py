"""Running a function in real tensor-parallel ranks: `run_ranks(fn, tp_size, *args)` spawns `tp_size` processes
(torch.multiprocessing, gloo over loopback), each joins the world with `init_parallel` and returns `fn(*args)`;
the parent gets {rank: result}. An exception in a rank fails the parent with that rank's traceback."""
from __future__ import annotations

import socket

import torch
import torch.multiprocessing as mp

from fovea import kernels
from fovea.distributed import parallel_state as ps
from fovea.distributed.parallel_state import ParallelLayout
from tests.conftest import SUITE_MODE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, tp_size: int, port: int, fn, args, results) -> None:
    torch.set_num_threads(1)
    kernels.set_mode(SUITE_MODE)
    ps.init_parallel(ParallelLayout(tp_size=tp_size, rank=rank), f"tcp://127.0.0.1:{port}", timeout_s=120)
    try:
        results[rank] = fn(*args)
    finally:
        ps.destroy_parallel()


def run_ranks(fn, tp_size: int, *args) -> dict:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_main, args=(tp_size, free_port(), fn, args, results), nprocs=tp_size, join=True)
        return dict(results)

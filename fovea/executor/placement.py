"""CPU threads and core binding per rank on a CPU host.

`num_threads` (EngineConfig) is per rank; unset, each rank gets an equal share of the CPUs this process may run
on (at least one). Rank r is bound to its own `num_threads` CPUs (`os.sched_setaffinity`) when the allowed
CPUs are enough for every rank to have its own; otherwise no rank is bound (the OS schedules them), and a log
line says so. More ranks than `MAX_RANKS_PER_CPU` per allowed CPU is refused: such a world only thrashes.
"""
from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

MAX_RANKS_PER_CPU = 2


def allowed_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def plan_cpus(world_size: int, num_threads: int | None,
              cpus: list[int] | None = None) -> tuple[int, list[list[int]] | None]:
    """(torch threads per rank, each rank's CPUs or None when they cannot each have their own)."""
    cpus = allowed_cpus() if cpus is None else cpus
    if world_size > MAX_RANKS_PER_CPU * len(cpus):
        raise ValueError(f"tensor_parallel_size * pipeline_parallel_size = {world_size} worker processes is more "
                         f"than {MAX_RANKS_PER_CPU} per CPU this process may use ({len(cpus)} allowed: {cpus}); "
                         f"at most {MAX_RANKS_PER_CPU * len(cpus)} ranks are allowed here")
    threads = num_threads or max(1, len(cpus) // world_size)
    if threads * world_size > len(cpus):
        logger.info("not binding %d rank(s) of %d thread(s) to CPUs: only %d CPU(s) allowed (%s)", world_size,
                    threads, len(cpus), cpus)
        return threads, None
    plan = [cpus[r * threads:(r + 1) * threads] for r in range(world_size)]
    logger.info("binding rank r to CPUs %s, %d thread(s) each", plan, threads)
    return threads, plan

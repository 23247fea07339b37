"""Executors: what runs the model runner(s) for the engine core.

    EngineCore ──► Executor.execute(SchedulerOutput) ──► ModelRunnerOutput
                   UniProcExecutor:    one ModelRunner in this process (TP = PP = 1, the default)
                   MultiprocExecutor:  tp_size * pp_size spawned worker processes, one ModelRunner each

`make_executor` picks by `EngineConfig.tensor_parallel_size * pipeline_parallel_size`.
"""
from fovea.executor.base import Executor, ExecutorDeadError, make_executor
from fovea.executor.multiproc import MultiprocExecutor
from fovea.executor.uniproc import UniProcExecutor

__all__ = ["Executor", "ExecutorDeadError", "MultiprocExecutor", "UniProcExecutor", "make_executor"]

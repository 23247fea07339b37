"""The executor interface: everything the engine core asks of the model side.

The engine core (scheduler included) never holds a model; it sizes the KV cache, allocates it and runs steps
through an `Executor`, in this order:

    num_blocks = executor.determine_num_kv_blocks(max_model_len, max_num_batched_tokens, profile_features)
    executor.allocate_kv_cache(num_blocks)
    executor.execute(scheduler_output) -> ModelRunnerOutput      (once per step)

With pipeline stages (`max_concurrent_batches` > 1) the engine core keeps several steps in flight instead
(fovea.engine.batch_queue): `execute_async(scheduler_output)` sends a step and returns a `StepFuture` at once,
`collect(future)` waits for its output; steps are answered in the order they were sent.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from fovea.config import EngineConfig
from fovea.engine.request import MultiModalFeature
from fovea.engine.scheduler_output import SchedulerOutput
from fovea.lora.request import LoRARequest
from fovea.outputs import ModelRunnerOutput


class ExecutorDeadError(RuntimeError):
    """A worker process died or the workers can no longer agree (a rank stuck in a collective): the executor
    is shut down and every later call raises this again. Not a per-request error: the engine stops."""


@dataclass(slots=True, eq=False)
class StepFuture:
    """A step sent to the model side: its output, or the exception its run raised, once `done`."""

    done: bool = False
    output: ModelRunnerOutput | None = None
    error: BaseException | None = None


class Executor(ABC):
    config: EngineConfig
    max_concurrent_batches: int = 1  # steps the engine core may have in flight at once (pipeline stages)

    @abstractmethod
    def determine_num_kv_blocks(self, max_model_len: int, max_num_batched_tokens: int,
                                profile_features: list[MultiModalFeature]) -> int:
        """KV blocks every rank can hold (the smallest rank's count when there are several)."""

    @abstractmethod
    def allocate_kv_cache(self, num_blocks: int) -> None: ...

    @abstractmethod
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...

    def execute_async(self, scheduler_output: SchedulerOutput) -> StepFuture:
        """Start a step; `collect` gives its output. Here: run it now (an executor with one step at a time)."""
        future = StepFuture(done=True)
        try:
            future.output = self.execute(scheduler_output)
        except ExecutorDeadError:
            raise
        except Exception as err:  # noqa: BLE001 - raised again by collect, as execute would have
            future.error = err
        return future

    def collect(self, future: StepFuture) -> ModelRunnerOutput:
        """The output of a step `execute_async` started (waiting for the steps sent before it); raises what its
        run raised."""
        if future.error is not None:
            raise future.error
        return future.output

    @property
    def num_steps_in_flight(self) -> int:
        """Steps sent and not yet collected."""
        return 0

    @abstractmethod
    def embed_pixels(self, pixel_values: torch.Tensor, pooling: str) -> list[torch.Tensor]:
        """BLIP-2 image embeddings (`fovea.engine.pooling.embed_pixels`, `max_num_seqs` images per forward): one
        float32 (rows, dim) tensor per image of pixel_values (N, 3, H, W)."""

    @abstractmethod
    def add_lora(self, lora_request: LoRARequest) -> None:
        """Read and check an adapter on every rank; ValueError naming the problem."""

    @abstractmethod
    def enable_structured_outputs(self, compiler) -> None:
        """Give the sampling rank a grammar compiler (fovea.engine.structured_output.GrammarCompiler)."""

    @abstractmethod
    def encoder_cache_bytes(self) -> int:
        """Bytes of encoder outputs held (the first stage's), for the metrics."""

    def shutdown(self) -> None:
        """Release workers (idempotent); the in-process executor has none."""

    @property
    def runner(self):
        """The in-process ModelRunner (embeddings, tests); an executor with worker processes has none here."""
        raise RuntimeError(f"{type(self).__name__} runs the model in worker processes: there is no model in the "
                           f"engine's process (model introspection needs tensor_parallel_size=1 and "
                           f"pipeline_parallel_size=1; embeddings go through embed_pixels)")


def make_executor(config: EngineConfig, hf_config, model_cls: type[nn.Module]) -> Executor:
    """In-process for TP = PP = 1 (unless `distributed_executor_backend="mp"`), else one worker process per rank."""
    backend = config.distributed_executor_backend
    if backend == "uni" or (backend is None and config.tensor_parallel_size * config.pipeline_parallel_size == 1):
        from fovea.executor.uniproc import UniProcExecutor

        return UniProcExecutor(config, hf_config, model_cls)
    from fovea.executor.multiproc import MultiprocExecutor

    return MultiprocExecutor(config, hf_config, model_cls)

"""The typed messages between the driver (engine core) and its worker processes.

Each is pickled once by the driver and the same bytes go to every rank (fovea.executor.multiproc). A step is
the scheduler's own `SchedulerOutput` (a new request's data once, then ids and counts) plus the tokens the
sampling rank drew in the previous step, for the ranks that did not draw them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fovea.config import EngineConfig
from fovea.distributed.parallel_state import ParallelLayout
from fovea.engine.request import MultiModalFeature
from fovea.engine.scheduler_output import SchedulerOutput
from fovea.lora.request import LoRARequest


@dataclass(slots=True)
class WorkerSpec:
    """What a spawned worker needs to become its rank."""

    config: EngineConfig
    hf_config: Any  # transformers PretrainedConfig
    model_cls: type
    layout: ParallelLayout
    init_method: str  # torch.distributed rendezvous (a file:// store in a private temporary directory)
    backend: str  # "gloo" on CPU, "nccl" where CUDA exists
    num_threads: int  # torch intra-op threads of this rank
    cpus: list[int] | None  # the CPUs to bind to; None: not bound (too few allowed CPUs)
    driver_pid: int  # the worker exits when this process is gone


@dataclass(slots=True)
class DetermineKVBlocks:
    max_model_len: int
    max_num_batched_tokens: int
    profile_features: list[MultiModalFeature]


@dataclass(slots=True)
class AllocateKVCache:
    num_blocks: int


@dataclass(slots=True)
class ExecuteStep:
    scheduler_output: SchedulerOutput
    # req id -> tokens the sampling rank drew last step (its ModelRunnerOutput); the others append them first
    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)


@dataclass(slots=True)
class EmbedPixels:
    """BLIP-2 image embeddings: computed by `rank` only (the first stage's TP rank 0, which holds the replicated
    ViT, Q-Former and projection); the other ranks answer None without computing (pixel_values is None for them)."""

    rank: int
    pixel_values: Any  # torch.Tensor (N, 3, H, W) for `rank`, None for the others
    pooling: str


@dataclass(slots=True)
class AddLoRA:
    lora_request: LoRARequest


@dataclass(slots=True)
class EnableStructuredOutputs:
    vocab_size: int


@dataclass(slots=True)
class Shutdown:
    pass


@dataclass(slots=True)
class WorkerReply:
    """One rank's answer: the value (the ModelRunnerOutput from the sampling rank, the block count when sizing,
    else None), or the exception it raised with the worker's traceback."""

    value: Any = None
    error: BaseException | None = None
    traceback: str = ""
    encoder_cache_bytes: int = 0

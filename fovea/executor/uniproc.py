"""UniProcExecutor: today's engine, one ModelRunner in the engine's own process (TP = PP = 1)."""
from __future__ import annotations

import torch
from torch import nn

from fovea.config import EngineConfig
from fovea.engine.pooling import embed_pixels
from fovea.engine.request import MultiModalFeature
from fovea.engine.scheduler_output import SchedulerOutput
from fovea.executor.base import Executor
from fovea.lora.request import LoRARequest
from fovea.outputs import ModelRunnerOutput
from fovea.worker.model_runner import ModelRunner


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig, hf_config, model_cls: type[nn.Module]):
        self.config = config
        self._runner = ModelRunner(config, hf_config, model_cls)

    @property
    def runner(self) -> ModelRunner:
        return self._runner

    def determine_num_kv_blocks(self, max_model_len: int, max_num_batched_tokens: int,
                                profile_features: list[MultiModalFeature]) -> int:
        return self._runner.determine_num_kv_blocks(max_model_len, max_num_batched_tokens, profile_features)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._runner.allocate_kv_cache(num_blocks)

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self._runner.execute(scheduler_output)

    def embed_pixels(self, pixel_values: torch.Tensor, pooling: str) -> list[torch.Tensor]:
        return embed_pixels(self._runner.model, pixel_values, pooling, self.config.max_num_seqs)

    def add_lora(self, lora_request: LoRARequest) -> None:
        self._runner.add_lora(lora_request)

    def enable_structured_outputs(self, compiler) -> None:
        self._runner.grammar_compiler = compiler

    def encoder_cache_bytes(self) -> int:
        return sum(t.nbytes for t in self._runner.encoder_cache.values())

"""EngineCore: add / schedule / execute / update, and nothing else.

    add_requests(Request...) ──► Scheduler
    step():  scheduler.schedule() ──► SchedulerOutput ──► executor.execute() ──► ModelRunnerOutput
             ──► scheduler.update_from_output() ──► list[RequestUpdate]   (tokens, finish, logprobs per sequence)

It sees sequences (a request with n > 1 is n of them, made by the output processor) and token ids, never text:
prompts come in processed (fovea.engine.input_processor) and updates go out to be turned into `RequestOutput`s
(fovea.engine.output_processor).

A step whose model run raises does not stop the engine: the scheduler's `fail_step` retries the step's sequences
one at a time until the one that raises alone is found; it finishes with FINISHED_ERROR (finish reason "error",
the exception as its stop reason) and every other request goes on as after a preemption. A dead executor (a
worker process gone, `ExecutorDeadError`) is not a request's fault: it propagates and the engine stops.

With pipeline stages (`executor.max_concurrent_batches` > 1) `step` goes through a batch queue instead
(fovea.engine.batch_queue): up to P steps in flight, so the stages overlap; the one-at-a-time path is unchanged.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from fovea.config import EngineConfig
from fovea.engine.batch_queue import BatchQueue, land_step
from fovea.engine.input_processor import profile_mm_features
from fovea.engine.request import Request, RequestStatus
from fovea.engine.scheduler import RequestUpdate, Scheduler, SchedulerConfig
from fovea.executor import make_executor
from fovea.lora.request import LoRARequest
from fovea.models.interfaces import is_encoder_decoder
from fovea.multimodal.processing import BaseMultiModalProcessor


class EngineCore:
    """Loads the model (through its executor: one in-process runner, or one worker process per TP/PP rank),
    sizes the KV cache from a worst-case step, and runs steps.

    `max_tokens_per_item`: the largest item of each modality a prompt may carry, in encoder tokens (modalities
    limited to 0 items left out); it sets the encoder budgets and the profiled worst case.
    """

    def __init__(self, config: EngineConfig, hf_config, model_cls: type[nn.Module], max_model_len: int,
                 processor: BaseMultiModalProcessor | None = None, mm_limits: Mapping[str, int] | None = None,
                 max_tokens_per_item: Mapping[str, int] | None = None):
        max_tokens_per_item = dict(max_tokens_per_item or {})
        chunked = config.enable_chunked_prefill
        max_batched = config.max_num_batched_tokens or (max(2048, config.max_num_seqs) if chunked else max_model_len)
        if not chunked and max_batched < max_model_len:
            raise ValueError(
                f"max_num_batched_tokens={max_batched} is below max_model_len={max_model_len}; "
                f"without chunked prefill a whole prompt must fit in one step"
            )
        largest_item = max(max_tokens_per_item.values(), default=0)
        # an encoder-decoder's whole encoder prompt (and its image) is encoded in the step that admits it
        default_budget = max_model_len + largest_item if is_encoder_decoder(hf_config) else largest_item
        encoder_budget = config.max_num_encoder_input_tokens or max(max_batched, default_budget)

        self.executor = make_executor(config, hf_config, model_cls)
        needs_profile = config.num_kv_blocks is None and config.kv_cache_memory_bytes is None
        features = profile_mm_features(processor, max_model_len, max_batched, max_tokens_per_item,
                                       mm_limits or {}) if needs_profile else []
        num_blocks = self.executor.determine_num_kv_blocks(max_model_len, max_batched, features)
        self.executor.allocate_kv_cache(num_blocks)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=max_batched,
            max_model_len=max_model_len,
            enable_chunked_prefill=chunked,
            block_size=config.block_size,
            num_blocks=num_blocks,
            enable_prefix_caching=config.enable_prefix_caching,
            max_num_encoder_input_tokens=encoder_budget,
            encoder_cache_size=config.encoder_cache_size or encoder_budget,
            max_tokens_per_mm_item=largest_item,
            max_loras=config.max_loras if config.enable_lora else None,
        ))
        num_batches = self.executor.max_concurrent_batches
        self.batch_queue = BatchQueue(self.scheduler, self.executor, num_batches) if num_batches > 1 else None

    def add_requests(self, requests: list[Request]) -> None:
        """Queue sequences all or none (ValueError naming the problem, nothing queued)."""
        self.scheduler.add_requests(requests)

    def add_lora(self, lora_request: LoRARequest) -> None:
        """Read and check an adapter now (vLLM's `add_lora`), so a bad one is refused before any request runs it."""
        self.executor.add_lora(lora_request)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def stop_requests(self, request_ids: Iterable[str]) -> None:
        """End sequences that the output side saw finish (a stop string in their text)."""
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_STOPPED)

    def step(self) -> list[RequestUpdate]:
        if self.batch_queue is not None:
            return self.batch_queue.step()
        scheduler_output = self.scheduler.schedule()
        return land_step(self.scheduler, scheduler_output, lambda: self.executor.execute(scheduler_output))

    def embed_pixels(self, pixel_values: torch.Tensor, pooling: str) -> list[torch.Tensor]:
        """Image embeddings of a BLIP-2 model (fovea.engine.pooling), wherever its image side runs (in this
        process, or in the first pipeline stage's worker)."""
        return self.executor.embed_pixels(pixel_values, pooling)

    @property
    def num_batches_in_flight(self) -> int:
        """Steps dispatched whose replies are not taken yet (pipeline micro-batches only). Such a batch may hold
        requests that are no longer unfinished (aborted while in flight: their KV blocks are freed when it lands),
        so a loop that steps "while requests are unfinished" must also step while this is non-zero."""
        return len(self.batch_queue.batches) if self.batch_queue is not None else 0

    def has_batches_in_flight(self) -> bool:
        return self.num_batches_in_flight > 0

    @property
    def runner(self):
        """The in-process ModelRunner (TP = PP = 1 only; see Executor.runner)."""
        return self.executor.runner

    def shutdown(self) -> None:
        self.executor.shutdown()

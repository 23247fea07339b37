"""The typed messages between the engine core and the model runner (vLLM v1's shapes).

    Scheduler.schedule() ──► SchedulerOutput ──► ModelRunner.execute() ──► ModelRunnerOutput
                                                                             (fovea.outputs)

A request's data crosses once, when it is first scheduled (`NewRequestData`); after that a step carries only
its id, the blocks it gained and its computed-token count (`CachedRequestData`). The runner keeps its own
copy of each request (token ids, block table, multimodal features, M-RoPE positions) and appends the tokens
it samples, so it never reads the scheduler's live `Request`. Pure Python: tensors inside multimodal features
and M-RoPE positions ride along opaquely.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fovea.engine.request import MultiModalFeature


@dataclass(slots=True)
class NewRequestData:
    """A request the runner has never seen: everything it needs to run it from now on."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: Any  # fovea.sampling_params.SamplingParams
    eos_token_id: int | None
    mm_features: list[MultiModalFeature]
    mrope_positions: Any  # [3, num_prompt_tokens] torch tensor for M-RoPE models, else None
    mrope_position_delta: int
    block_ids: list[int]  # the whole block table after this step's allocation
    num_computed_tokens: int  # before this step: the prefix-cache hit, in tokens
    lora_request: Any = None  # fovea.lora.request.LoRARequest the request runs with; None: the base model
    encoder_prompt_token_ids: list[int] | None = None  # encoder-decoder models: the encoder's prompt
    cross_block_ids: list[int] = field(default_factory=list)  # its cross-attention K/V blocks (whole table)


@dataclass(slots=True)
class CachedRequestData:
    """Requests the runner already holds, as parallel lists (one entry per request)."""

    req_ids: list[str] = field(default_factory=list)
    # True: the request was preempted since it last ran; its blocks were freed, so `new_block_ids` is its whole
    # new table (the runner replaces the old one). Its token ids, sampled ones included, are still the runner's.
    resumed_from_preemption: list[bool] = field(default_factory=list)
    new_block_ids: list[list[int]] = field(default_factory=list)  # blocks appended this step (or the whole table)
    num_computed_tokens: list[int] = field(default_factory=list)  # before this step
    # encoder-decoder models, resumed requests: their new cross blocks (the encoder runs again); else []
    new_cross_block_ids: list[list[int]] = field(default_factory=list)

    @property
    def num_reqs(self) -> int:
        return len(self.req_ids)


@dataclass(slots=True)
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: CachedRequestData
    # req id -> tokens computed this step, in the flat batch's order (running requests first, then admitted ones).
    # A request computes token ids [num_computed_tokens, num_computed_tokens + n) and samples when that reaches
    # its last known token.
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # req id -> indices into its mm_features to encode this step, whole. Outputs are keyed by mm_hash: an item
    # not listed but overlapping the chunk is cached, or encoded this step for another request or item.
    scheduled_encoder_inputs: dict[str, list[int]]
    preempted_request_ids: list[str]  # the runner keeps their state: they come back as resumed cached requests
    finished_request_ids: list[str]  # finished or aborted since the last schedule(): drop their state
    freed_mm_hashes: list[str]  # encoder outputs the runner may delete (before encoding this step's inputs)
    # encoder-decoder models: requests whose encoder runs this step (admitted, or resumed after preemption),
    # before the decoder, its output's K/V written into the request's cross blocks
    scheduled_encoder_prompts: list[str] = field(default_factory=list)
    # (source, destination) KV blocks to copy before this step writes any KV: the partial last block a forked
    # beam takes from its parent (copy-on-write; the full blocks are shared by reference)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)

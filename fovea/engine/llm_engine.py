"""LLMEngine: add_request / step / abort, the loop that ties the pipeline together.

    schedule() -> SchedulerOutput -> runner.execute() -> ModelRunnerOutput -> update_from_output()
    -> detokenize, stop strings -> RequestOutput

Nothing calls back up the stack: each stage hands plain data to the next.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import transformers

from fovea.config import EngineConfig
from fovea.engine.detokenizer import IncrementalDetokenizer
from fovea.engine.input_processor import InputProcessor, PromptType
from fovea.engine.request import Request, RequestStatus
from fovea.engine.scheduler import Scheduler, SchedulerConfig
from fovea.models.registry import resolve_model_class
from fovea.multimodal.processing import InputProcessingContext
from fovea.multimodal.registry import MULTIMODAL_REGISTRY
from fovea.outputs import CompletionOutput, RequestOutput
from fovea.sampling_params import SamplingParams
from fovea.worker.model_runner import ModelRunner

_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(eq=False)
class _CompletionState:
    """Output side of one sequence (one of a request's `n`)."""

    request: Request
    index: int
    detokenizer: IncrementalDetokenizer
    logprobs: list | None
    cumulative_logprob: float | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(eq=False)
class _ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[_CompletionState] = field(default_factory=list)
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.hf_config = transformers.AutoConfig.from_pretrained(config.model)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(config.tokenizer_path)
        model_cls = resolve_model_class(list(getattr(self.hf_config, "architectures", None) or []))
        text_config = self.hf_config.get_text_config()
        self.max_model_len = self._resolve_max_model_len(text_config)
        self.runner = ModelRunner(config, self.hf_config, model_cls)

        self.processor = None
        mm_limits: dict[str, int] = {}
        max_tokens_per_item: dict[str, int] = {}
        if MULTIMODAL_REGISTRY.supports_multimodal(model_cls):
            ctx = InputProcessingContext(config.model, self.hf_config, self.tokenizer, dict(config.mm_processor_kwargs or {}))
            self.processor = MULTIMODAL_REGISTRY.create_processor(model_cls, ctx)
            mm_limits = self.processor.info.get_allowed_mm_limits(config.limit_mm_per_prompt)
            most_tokens = self.processor.info.get_mm_max_tokens_per_item(self.max_model_len, mm_limits)
            # a modality limited to 0 items per prompt never reaches the encoder: it sizes nothing
            max_tokens_per_item = {m: most_tokens[m] for m, limit in mm_limits.items() if limit > 0}
        self.mm_limits = mm_limits
        self._max_tokens_per_item = max_tokens_per_item

        chunked = config.enable_chunked_prefill
        max_batched = config.max_num_batched_tokens or (max(2048, config.max_num_seqs) if chunked else self.max_model_len)
        if not chunked and max_batched < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens={max_batched} is below max_model_len={self.max_model_len}; "
                f"without chunked prefill a whole prompt must fit in one step"
            )
        largest_item = max(max_tokens_per_item.values(), default=0)
        encoder_budget = config.max_num_encoder_input_tokens or max(max_batched, largest_item)
        encoder_cache = config.encoder_cache_size or encoder_budget
        num_blocks = self._size_kv_cache(max_batched, mm_limits)
        self.runner.allocate_kv_cache(num_blocks)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=max_batched,
            max_model_len=self.max_model_len,
            enable_chunked_prefill=chunked,
            block_size=config.block_size,
            num_blocks=num_blocks,
            enable_prefix_caching=config.enable_prefix_caching,
            max_num_encoder_input_tokens=encoder_budget,
            encoder_cache_size=encoder_cache,
            max_tokens_per_mm_item=largest_item,
        ))
        eos = getattr(text_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_token_id = eos
        self.input_processor = InputProcessor(
            tokenizer=self.tokenizer, processor=self.processor, max_model_len=self.max_model_len,
            vocab_size=text_config.vocab_size, mm_limits=mm_limits, mm_processor_kwargs=config.mm_processor_kwargs,
            eos_token_id=eos,
            mrope_positions=self.runner.model.get_mrope_input_positions
            if getattr(self.runner.model, "supports_mrope", False) else None,
        )
        self._parents: dict[str, _ParentState] = {}
        self._children: dict[str, _CompletionState] = {}
        self._child_parent: dict[str, str] = {}
        self._arrivals = itertools.count()

    # ---- set-up ---------------------------------------------------------------------------------------------

    def _resolve_max_model_len(self, text_config) -> int:
        limit = getattr(text_config, "max_position_embeddings", None)
        wanted = self.config.max_model_len or limit
        if wanted is None:
            raise ValueError("the checkpoint does not say its max_position_embeddings; pass max_model_len")
        if limit is not None and wanted > limit:
            raise ValueError(f"max_model_len={wanted} exceeds the model's max_position_embeddings={limit}")
        return wanted

    def _size_kv_cache(self, max_batched: int, mm_limits: Mapping[str, int]) -> int:
        config = self.config
        per_block = self.runner.kv_bytes_per_block()
        # block 0 is the scheduler's reserved null block, hence the +1 below
        blocks_per_seq = math.ceil(self.max_model_len / config.block_size) + 1
        if config.num_kv_blocks is not None:
            return config.num_kv_blocks
        if config.kv_cache_memory_bytes is not None:
            num_blocks = config.kv_cache_memory_bytes // per_block
        else:
            features = []
            counts = self._profile_mm_counts(max_batched, mm_limits) if self.processor is not None else {}
            if counts:
                dummy = self.processor.dummy_inputs.get_dummy_processor_inputs(self.max_model_len, counts)
                hashes = {m: [f"dummy-{m}-{i}" for i in range(len(v))] for m, v in dummy.mm_data.items()}
                features = self.processor.apply(dummy.prompt or [0], dummy.mm_data, hashes).mm_features
            peak = self.runner.profile_peak_bytes(min(max_batched, self.max_model_len), features)
            budget = int(_available_memory_bytes() * config.memory_utilization) - peak
            num_blocks = max(0, budget) // per_block
            # never more than every running sequence at full length could use
            num_blocks = min(num_blocks, config.max_num_seqs * blocks_per_seq)
        if num_blocks < blocks_per_seq:
            raise ValueError(
                f"the KV cache has room for {num_blocks} blocks of {config.block_size} tokens, fewer than one "
                f"max_model_len={self.max_model_len} sequence needs ({blocks_per_seq}, with the reserved null block); "
                f"give more memory or lower max_model_len"
            )
        return num_blocks

    def _profile_mm_counts(self, max_batched: int, mm_limits: Mapping[str, int]) -> dict[str, int]:
        """Items for the worst-case step: as many of the largest modality as one step's tokens can hold. Modalities
        limited to 0 items per prompt are left out (none left: {}, a text-only profile)."""
        per_item = self._max_tokens_per_item
        if not per_item:
            return {}
        modality = max(per_item, key=per_item.get)
        fit = max(1, min(max_batched, self.max_model_len) // max(1, per_item[modality]))
        return {modality: min(mm_limits[modality], fit)}

    # ---- requests -------------------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None) -> None:
        """Validate and queue a request; a bad one raises ValueError and leaves the engine untouched."""
        params = params or SamplingParams()
        if request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = self.input_processor.process(request_id, prompt, params, next(self._arrivals))
        if params.max_tokens is None:
            params = params.clone()
            params.max_tokens = self.max_model_len - request.num_prompt_tokens
        parent = _ParentState(request_id, request.prompt, request.prompt_token_ids)
        children = []
        for index in range(params.n):
            child_params = params
            if params.n > 1:
                child_params = params.clone()
                child_params.n = 1
                if params.seed is not None:
                    child_params.seed = params.seed + index
            child_id = request_id if params.n == 1 else f"{index}_{request_id}"
            child = Request(request_id=child_id, prompt_token_ids=request.prompt_token_ids,
                            sampling_params=child_params, eos_token_id=request.eos_token_id,
                            mm_features=request.mm_features, prompt=request.prompt,
                            arrival_index=request.arrival_index, mrope_positions=request.mrope_positions,
                            mrope_position_delta=request.mrope_position_delta)
            children.append(_CompletionState(
                request=child, index=index,
                detokenizer=IncrementalDetokenizer(self.tokenizer, child_params, request.prompt_token_ids),
                logprobs=[] if child_params.logprobs is not None else None,
                cumulative_logprob=0.0 if child_params.logprobs is not None else None,
            ))
        for child in children:
            self.scheduler.add_request(child.request)  # may raise (an item larger than the encoder budget)
        parent.children = children
        self._parents[request_id] = parent
        for child in children:
            self._children[child.request.request_id] = child
            self._child_parent[child.request.request_id] = request_id

    def abort_request(self, request_ids: str | list[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        child_ids = [c.request.request_id for rid in ids if rid in self._parents for c in self._parents[rid].children]
        self.scheduler.finish_requests(child_ids, RequestStatus.FINISHED_ABORTED)
        for rid in ids:
            parent = self._parents.pop(rid, None)
            for child in parent.children if parent else []:
                self._children.pop(child.request.request_id, None)
                self._child_parent.pop(child.request.request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    def get_num_unfinished_requests(self) -> int:
        return len(self._parents)

    # ---- the loop -------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; return a RequestOutput for every request that produced tokens or finished."""
        sched_out = self.scheduler.schedule()
        runner_out = self.runner.execute(sched_out)
        updates = self.scheduler.update_from_output(sched_out, runner_out.sampled_token_ids)
        touched: dict[str, _ParentState] = {}
        stopped_by_string = []
        for update in updates:
            state = self._children.get(update.request_id)
            if state is None:
                continue
            for entry in runner_out.logprobs.get(update.request_id, []):
                self._add_logprobs(state, entry, update.new_token_ids)
            ended_on_token = update.finished and update.status == RequestStatus.FINISHED_STOPPED
            stop_str = state.detokenizer.update(update.new_token_ids, finished=update.finished,
                                                stop_terminated=ended_on_token)
            if stop_str is not None:
                # a stop string wins over a length finish in the same step, as in vLLM
                state.finish_reason, state.stop_reason = "stop", stop_str
                if not update.finished:
                    stopped_by_string.append(update.request_id)
            elif update.finished:
                state.finish_reason = _FINISH_REASONS[update.status]
                state.stop_reason = update.stop_reason
            touched[self._child_parent[update.request_id]] = self._parents[self._child_parent[update.request_id]]
        if stopped_by_string:
            self.scheduler.finish_requests(stopped_by_string, RequestStatus.FINISHED_STOPPED)
        outputs = []
        for parent in touched.values():
            outputs.append(self._make_output(parent))
            if parent.finished:
                self._parents.pop(parent.request_id, None)
                for child in parent.children:
                    self._children.pop(child.request.request_id, None)
                    self._child_parent.pop(child.request.request_id, None)
        return outputs

    def _add_logprobs(self, state: _CompletionState, entry: dict, new_token_ids: list[int]) -> None:
        for token_id, logprob in entry.items():
            if logprob.decoded_token is None:
                logprob.decoded_token = self.tokenizer.decode([token_id])
        state.logprobs.append(entry)
        sampled = new_token_ids[0] if new_token_ids else None
        if sampled in entry:
            state.cumulative_logprob += entry[sampled].logprob

    def _make_output(self, parent: _ParentState) -> RequestOutput:
        completions = []
        for child in parent.children:
            completions.append(CompletionOutput(
                index=child.index,
                text=child.detokenizer.output_text,
                token_ids=list(child.request.output_token_ids),
                cumulative_logprob=child.cumulative_logprob,
                logprobs=child.logprobs,
                finish_reason=child.finish_reason,
                stop_reason=child.stop_reason,
            ))
        cached = parent.children[0].request.num_cached_prompt_tokens if parent.children else 0
        return RequestOutput(request_id=parent.request_id, prompt=parent.prompt,
                             prompt_token_ids=parent.prompt_token_ids, outputs=completions,
                             finished=parent.finished, num_cached_tokens=cached)


def _available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30

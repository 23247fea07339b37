"""Token-budget scheduler in the style of vLLM v1: no prefill or decode phases.

Every step each request's `num_computed_tokens` catches up with its `num_tokens` (prompt + outputs so far)
as far as the budgets allow; a prompt chunk, a decode step and a prefix-cache hit are the same mechanism.

One step:  out = scheduler.schedule();  runner_out = runner.execute(out);  scheduler.update_from_output(out, runner_out)

`schedule()` returns a `SchedulerOutput` (scheduler_output.py): a request's data goes to the runner once, when it
is first scheduled; afterwards only ids, new blocks and counts.

- Running requests go first, in admission order. When the KV pool is short, the most recently admitted
  running request is preempted (blocks and encoder references freed, `num_computed_tokens = 0`, front of the
  waiting queue) and later resumes by recomputing prompt + outputs ("recompute" preemption; the prefix cache
  may cover part of it). A step that preempted admits no one.
- Waiting requests are then admitted first-come first-served while the token budget, `max_num_seqs` and the
  pool allow; the first that does not fit stops admission (no overtaking). The one exception is LoRA: a
  request whose adapter would make more than `max_loras` distinct adapters among the running requests is
  passed over (it keeps its place in the queue) and later ones may be admitted, as vLLM does.
- A multimodal item is encoded whole, once, in the step whose chunk first overlaps its placeholders; it is
  charged to the step's encoder budget and to the encoder cache, and the chunk stops just before an item
  that does not fit. Its output is released once the request has computed all of its placeholders.
- Encoder-decoder requests (T5) run their encoder in the step that admits them and hold cross-attention blocks
  for their life: fovea.engine.encoder_decoder.
- Nothing is ever dropped: a request that could never fit the pool or the encoder limits is refused by
  `add_request` (ValueError), because that is a configuration error, not a load problem.
- A step whose model run raised (`fail_step`) cannot say which request broke it. If it ran one sequence, that
  one finishes with FINISHED_ERROR (the error text as its stop reason). If it ran several, every running
  request is preempted (recompute; the blocks the failed step was to write lose their prefix-cache hashes) and
  the step's sequences become *suspects*: while any remain, steps run one suspect alone until it has recomputed
  past the point where the batch failed (then it is cleared and preempted again, its blocks now prefix hits)
  or fails alone. Then normal batching resumes. A fault costs recompute, never another request's answer.
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from fovea.engine.encoder_cache import EncoderCacheManager
from fovea.engine.encoder_decoder import check_encoder_prompt, plan_encoder_prompt
from fovea.engine.kv_cache import KVCacheManager
from fovea.engine.request import Request, RequestStatus
from fovea.engine.scheduler_forks import BeamForks
from fovea.engine.scheduler_in_flight import InFlight
from fovea.engine.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput
from fovea.outputs import Logprob, ModelRunnerOutput

logger = logging.getLogger(__name__)


@dataclass(slots=True, kw_only=True)
class SchedulerConfig:
    num_blocks: int  # KV blocks in the pool, including the reserved null block 0 (num_blocks - 1 usable)
    block_size: int = 16  # tokens per KV block
    max_num_seqs: int = 64  # running requests at once
    max_num_batched_tokens: int = 2048  # tokens scheduled per step, over all requests
    max_model_len: int = 2048  # prompt + outputs of one request
    enable_chunked_prefill: bool = True  # False: a request's remaining tokens are scheduled in one step or not at all
    enable_prefix_caching: bool = True
    max_tokens_per_mm_item: int = 0  # the model's largest multimodal item in encoder tokens (0: text only)
    # per-step encoder compute budget, in encoder tokens; None = max(max_num_batched_tokens, max_tokens_per_mm_item)
    max_num_encoder_input_tokens: int | None = None
    encoder_cache_size: int | None = None  # encoder outputs kept, in encoder tokens; None: as above
    max_loras: int | None = None  # most distinct LoRA adapters among running requests; None: no limit

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SchedulerConfig.{name} must be a positive int, got {value!r}")
        if self.max_loras is not None and (not isinstance(self.max_loras, int) or self.max_loras < 1):
            raise ValueError(f"SchedulerConfig.max_loras must be a positive int or None, got {self.max_loras!r}")
        for name in ("enable_chunked_prefill", "enable_prefix_caching"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SchedulerConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.num_blocks < 2:
            raise ValueError(f"SchedulerConfig.num_blocks must be >= 2 (block 0 is reserved), got {self.num_blocks}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"SchedulerConfig.max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}) without chunked prefill, or a long prompt could never be scheduled"
            )
        if self.max_tokens_per_mm_item < 0:
            raise ValueError(f"SchedulerConfig.max_tokens_per_mm_item must be >= 0, got {self.max_tokens_per_mm_item}")
        default = max(self.max_num_batched_tokens, self.max_tokens_per_mm_item)
        if self.max_num_encoder_input_tokens is None:
            self.max_num_encoder_input_tokens = default
        if self.encoder_cache_size is None:
            self.encoder_cache_size = default
        for name in ("max_num_encoder_input_tokens", "encoder_cache_size"):
            if getattr(self, name) < self.max_tokens_per_mm_item:
                raise ValueError(
                    f"SchedulerConfig.{name} ({getattr(self, name)}) must be >= max_tokens_per_mm_item "
                    f"({self.max_tokens_per_mm_item}), or the largest item could never be encoded"
                )


@dataclass(slots=True)
class RequestUpdate:
    """One per request that got a token or finished in `update_from_output` (vLLM's EngineCoreOutput)."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    status: RequestStatus
    stop_reason: int | str | None
    new_logprobs: list[dict[int, Logprob]] | None = None  # one entry per new token, if the request asked
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache when it was first scheduled
    error: str | None = None  # status FINISHED_ERROR: what the model raised
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # prompt tokens 1..P-1, once, if asked


class Scheduler(BeamForks, InFlight):
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.kv_cache_manager = KVCacheManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.encoder_cache_manager = EncoderCacheManager(config.encoder_cache_size)
        self.requests: dict[str, Request] = {}  # unfinished ones
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order; the tail is preempted first
        self.finished_request_ids: list[str] = []  # since the last schedule()
        self.num_preemptions = 0
        # after a failed batched step: sequence id -> tokens it must compute alone to be cleared (see fail_step)
        self.suspects: dict[str, int] = {}
        self.num_failed_steps = 0
        # beam search: finished sequences whose KV blocks are kept for forks (`Request.hold_kv`), how many
        # queued forks still need each, and the ones released while forks were pending (freed once none is)
        self.held: dict[str, Request] = {}
        self.num_pending_forks: dict[str, int] = {}
        self.release_requested: set[str] = set()
        self.init_in_flight()  # pipeline micro-batches (scheduler_in_flight.py); off unless the batch queue runs

    # ---- requests in and out -------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request; ValueError if it could never be served under this configuration."""
        self.add_requests([request])

    def add_requests(self, requests: list[Request]) -> None:
        """Queue several requests (the n children of one prompt) all or none: every one is checked, ids
        included, before any is queued, so a refused one leaves no sibling behind."""
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError(f"request ids {ids} repeat one another")
        for request in requests:
            self._check_request(request)
        for request in requests:
            if request.fork_parent is not None:
                self.num_pending_forks[request.fork_parent] = self.num_pending_forks.get(request.fork_parent, 0) + 1
            request.status = RequestStatus.WAITING
            self.requests[request.request_id] = request
            self.waiting.append(request)

    def _check_request(self, request: Request) -> None:
        cfg, rid = self.config, request.request_id
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        num_prompt = request.num_prompt_tokens
        if num_prompt == 0:
            raise ValueError(f"request {rid!r} has an empty prompt")
        if num_prompt > cfg.max_model_len:
            raise ValueError(f"request {rid!r}: {num_prompt} prompt tokens exceed max_model_len {cfg.max_model_len}")
        if request.fork_parent is not None and (request.fork_parent not in self.held
                                                or request.fork_parent in self.release_requested):
            raise ValueError(f"request {rid!r} forks {request.fork_parent!r}, which holds no KV blocks (it is not a "
                             f"finished hold_kv sequence, or it was released)")
        # the last sampled token is never fed back, so the KV holds at most this many tokens
        max_tokens = request.sampling_params.max_tokens
        max_len = cfg.max_model_len if max_tokens is None else min(num_prompt + max_tokens, cfg.max_model_len)
        max_kv_tokens = max(num_prompt, max_len - 1)
        num_blocks = -(-max_kv_tokens // cfg.block_size)
        if num_blocks > self.kv_cache_manager.num_usable_blocks:
            raise ValueError(
                f"request {rid!r} may need {num_blocks} KV blocks ({max_kv_tokens} tokens) but the pool has "
                f"{self.kv_cache_manager.num_usable_blocks}; raise num_blocks or lower max_tokens / max_model_len"
            )
        encoder_limit = min(cfg.max_num_encoder_input_tokens, cfg.encoder_cache_size)
        if request.encoder_prompt_token_ids is not None:
            check_encoder_prompt(request, cfg.max_num_encoder_input_tokens, cfg.encoder_cache_size,
                                 cfg.block_size, num_blocks, self.kv_cache_manager.num_usable_blocks)
            num_prompt = request.num_encoder_tokens  # the placeholders are in the encoder's prompt
        end, per_hash = 0, {}
        for f in request.mm_features:
            if f.offset < end or f.length < 1 or f.offset + f.length > num_prompt:
                raise ValueError(f"request {rid!r}: multimodal placeholders must be sorted, disjoint and in the prompt")
            end = f.offset + f.length
            if f.num_encoder_tokens > encoder_limit:
                raise ValueError(
                    f"request {rid!r}: a {f.modality} item of {f.num_encoder_tokens} encoder tokens exceeds "
                    f"max_num_encoder_input_tokens / encoder_cache_size ({encoder_limit})"
                )
            per_hash[f.mm_hash] = f.num_encoder_tokens
        if not cfg.enable_chunked_prefill and sum(per_hash.values()) > encoder_limit:
            raise ValueError(
                f"request {rid!r}: without chunked prefill all its items ({sum(per_hash.values())} encoder tokens) "
                f"are encoded in one step, over max_num_encoder_input_tokens / encoder_cache_size ({encoder_limit})"
            )

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> None:
        """Finish requests from outside (abort, or a stop string found by the detokenizer). Unknown or already
        finished ids are ignored. Their blocks and encoder references are freed now."""
        if not status.is_finished:
            raise ValueError(f"finish_requests needs a finished status, got {status.name}")
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        was_running = False
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is None:
                continue
            if self.in_flight and self._defer_finish(rid, status):
                continue  # applied when its batch lands
            if request.status == RequestStatus.RUNNING:
                was_running = True
            else:
                self.waiting.remove(request)
            request.status = status
            self._free_request(request)
        if was_running:
            self.running = [r for r in self.running if not r.is_finished]

    def _free_request(self, request: Request) -> None:
        if request.hold_kv and request.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH):
            self.held[request.request_id] = request  # its blocks stay until release_held
        else:
            self.kv_cache_manager.free(request)
        if request.fork_parent is not None:  # a fork that never ran: its parent need not wait for it
            self._fork_done(request.fork_parent)
            request.fork_parent = None
        self.encoder_cache_manager.free(request)
        del self.requests[request.request_id]
        self.suspects.pop(request.request_id, None)
        self.finished_request_ids.append(request.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- one step --------------------------------------------------------------------------------------------

    def schedule(self, max_num_seqs_in_step: int | None = None) -> SchedulerOutput:
        """The next step. `max_num_seqs_in_step` caps the sequences of this one step (the batch queue splits the
        running requests into micro-batches with it); None: only `max_num_seqs` running in all."""
        cfg, kv = self.config, self.kv_cache_manager
        in_flight = self.in_flight
        token_budget = cfg.max_num_batched_tokens
        encoder_budget = cfg.max_num_encoder_input_tokens
        out = SchedulerOutput(
            scheduled_new_reqs=[], scheduled_cached_reqs=CachedRequestData(), num_scheduled_tokens={},
            total_num_scheduled_tokens=0, scheduled_encoder_inputs={}, preempted_request_ids=[],
            finished_request_ids=[], freed_mm_hashes=[],
        )
        preempted_ids = out.preempted_request_ids
        max_num_seqs = cfg.max_num_seqs
        if self.suspects:  # isolating after a failed step: one suspect alone (fail_step preempted the rest)
            max_num_seqs = 1
            if not self.running:  # the last one first: each that steps aside goes back to the front, in order
                suspect = next(r for r in reversed(self.waiting) if r.request_id in self.suspects)
                self.waiting.remove(suspect)
                self.waiting.appendleft(suspect)
        step_cap = max_num_seqs if max_num_seqs_in_step is None else min(max_num_seqs_in_step, max_num_seqs)
        scheduled = out.num_scheduled_tokens

        index = 0
        while index < len(self.running) and token_budget > 0 and len(scheduled) < step_cap:
            request = self.running[index]
            if in_flight and request.request_id in in_flight:
                index += 1  # its batch is still in the pipeline
                continue
            num_remaining = request.num_tokens - request.num_computed_tokens
            num_new = min(num_remaining, token_budget)
            num_new, to_encode, to_share = self._plan_encoder(
                request, request.num_computed_tokens, num_new, encoder_budget
            )
            if num_new == 0 or (not cfg.enable_chunked_prefill and num_new < num_remaining):
                index += 1
                continue
            while (new_blocks := kv.allocate_slots(request, num_new)) is None:
                victim = self._pop_victim()
                self._preempt(victim)
                preempted_ids.append(victim.request_id)
                if victim is request:
                    break
            if new_blocks is None:
                break
            cached = out.scheduled_cached_reqs
            cached.req_ids.append(request.request_id)
            cached.resumed_from_preemption.append(False)
            cached.new_block_ids.append([b.block_id for b in new_blocks])
            cached.num_computed_tokens.append(request.num_computed_tokens)
            cached.new_cross_block_ids.append([])
            self._commit(out, request, num_new, to_encode, to_share)
            encoder_budget -= sum(request.mm_features[i].num_encoder_tokens for i in to_encode)
            token_budget -= num_new
            index += 1

        passed_over: deque[Request] = deque()  # adapters over max_loras this step: back to the queue's front
        while (not preempted_ids and self.waiting and token_budget > 0 and len(self.running) < max_num_seqs
               and len(scheduled) < step_cap):
            request = self.waiting[0]
            if not self._lora_fits(request):
                passed_over.append(self.waiting.popleft())
                continue
            if request.fork_parent is not None:
                if not self._admit_fork(out, request):
                    break
                token_budget -= 1
                continue
            # prompt logprobs need every prompt position's logits: such a request takes no prefix hit (as vLLM)
            computed_blocks, num_computed = ([], 0) if getattr(request.sampling_params, "prompt_logprobs", None) \
                is not None else kv.get_computed_blocks(request)
            num_remaining = request.num_tokens - num_computed
            num_new = min(num_remaining, token_budget)
            if not cfg.enable_chunked_prefill and num_new < num_remaining:
                break
            num_new, to_encode, to_share = self._plan_encoder(request, num_computed, num_new, encoder_budget)
            encoder_cost = 0
            if request.encoder_prompt_token_ids is not None:  # its encoder runs in the step that admits it
                encoder_cost, to_encode, to_share = plan_encoder_prompt(self.encoder_cache_manager, request,
                                                                        encoder_budget)
                num_new = num_new if encoder_cost else 0
            if (
                num_new == 0
                or (not cfg.enable_chunked_prefill and num_new < num_remaining)
                or kv.allocate_slots(request, num_new, computed_blocks, request.num_encoder_tokens) is None
            ):
                self.encoder_cache_manager.free(request)  # references taken while planning
                break
            self.waiting.popleft()
            block_ids = kv.get_block_ids(request.request_id)
            if request.status == RequestStatus.WAITING:
                request.num_cached_prompt_tokens = num_computed
                out.scheduled_new_reqs.append(NewRequestData(
                    req_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
                    sampling_params=request.sampling_params, eos_token_id=request.eos_token_id,
                    mm_features=request.mm_features, mrope_positions=request.mrope_positions,
                    mrope_position_delta=request.mrope_position_delta, block_ids=block_ids,
                    num_computed_tokens=num_computed, lora_request=request.lora_request,
                    encoder_prompt_token_ids=request.encoder_prompt_token_ids,
                    cross_block_ids=kv.get_cross_block_ids(request.request_id),
                ))
            else:  # back from preemption: the runner still holds its tokens, its blocks are all new
                cached = out.scheduled_cached_reqs
                cached.req_ids.append(request.request_id)
                cached.resumed_from_preemption.append(True)
                cached.new_block_ids.append(block_ids)
                cached.num_computed_tokens.append(num_computed)
                cached.new_cross_block_ids.append(kv.get_cross_block_ids(request.request_id))
            if request.encoder_prompt_token_ids is not None:
                out.scheduled_encoder_prompts.append(request.request_id)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_computed
            self.running.append(request)
            self._commit(out, request, num_new, to_encode, to_share)
            encoder_budget -= encoder_cost or sum(request.mm_features[i].num_encoder_tokens for i in to_encode)
            token_budget -= num_new

        self.waiting.extendleft(reversed(passed_over))
        if self.release_requested:
            self._release_forked()  # after every allocation of this step, so no copy source is reused in it
        out.total_num_scheduled_tokens = cfg.max_num_batched_tokens - token_budget
        out.finished_request_ids, self.finished_request_ids = self.finished_request_ids, []
        out.freed_mm_hashes = self.encoder_cache_manager.get_freed_mm_hashes()
        if self.track_in_flight:
            in_flight.update(scheduled)
        return out

    def _lora_fits(self, request: Request) -> bool:
        """Admitting `request` keeps the running batch within `max_loras` distinct adapters."""
        lora = request.lora_request
        if lora is None or self.config.max_loras is None:
            return True
        running = {r.lora_request.lora_int_id for r in self.running if r.lora_request is not None}
        return lora.lora_int_id in running or len(running) < self.config.max_loras

    def _plan_encoder(
        self, request: Request, num_computed: int, num_new: int, encoder_budget: int
    ) -> tuple[int, list[int], list[int]]:
        """Which items the chunk [num_computed, num_computed + num_new) must encode, shrinking it before the
        first item that does not fit. Returns (num_new, items to encode, items sharing an output encoded by
        an earlier item of this chunk). Items already cached are referenced right away (as vLLM does), so a
        preemption later in this step cannot free them under us."""
        to_encode: list[int] = []
        to_share: list[int] = []
        if not request.mm_features or request.encoder_prompt_token_ids is not None:
            return num_new, to_encode, to_share  # an encoder-decoder's items go with its encoder prompt
        encoder_cache = self.encoder_cache_manager
        end = num_computed + num_new
        planned_hashes: set[str] = set()
        num_planned = 0
        for idx, f in enumerate(request.mm_features):
            if f.offset >= end:
                break
            if f.offset + f.length <= num_computed:
                continue  # fully computed: its embeddings are in the KV cache already
            if encoder_cache.check_and_update_cache(request, idx):
                continue
            if f.mm_hash in planned_hashes:
                to_share.append(idx)
                continue
            if not encoder_cache.can_allocate(request, idx, encoder_budget - num_planned, num_planned):
                return max(0, f.offset - num_computed), to_encode, to_share
            to_encode.append(idx)
            planned_hashes.add(f.mm_hash)
            num_planned += f.num_encoder_tokens
        return num_new, to_encode, to_share

    def _commit(self, out: SchedulerOutput, request: Request, num_new: int, to_encode: list[int],
                to_share: list[int]) -> None:
        for idx in to_encode:
            self.encoder_cache_manager.allocate(request, idx)
        for idx in to_share:
            self.encoder_cache_manager.check_and_update_cache(request, idx)
        out.num_scheduled_tokens[request.request_id] = num_new
        if to_encode:
            out.scheduled_encoder_inputs[request.request_id] = to_encode
        request.num_computed_tokens += num_new  # as vLLM v1: the step is taken as done once scheduled

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        self.encoder_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update_from_output(self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
                           ) -> list[RequestUpdate]:
        """Take the runner's tokens for the step `scheduler_output` described (one call per schedule()).

        Only requests whose chunk reached their last known token sample; a request still in the middle of its
        prompt has no entry. A request finished from outside after schedule() is skipped.
        """
        if self.in_flight:
            self.land(scheduler_output)
        updates: list[RequestUpdate] = []
        any_finished = False
        row_of = {rid: row for row, rid in enumerate(runner_output.req_ids)}
        logprobs = runner_output.logprobs
        for rid in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(rid)
            if request is None:
                continue  # finished from outside after schedule()
            if request.encoder_prompt_token_ids is not None:
                self.encoder_cache_manager.free(request)  # its items were merged into the encoder's input
            elif request.mm_features:
                self._free_computed_encoder_inputs(request)
            if request.num_computed_tokens < request.num_tokens:
                continue
            row = row_of.get(rid)
            if row is None:
                raise ValueError(f"no sampled token for request {rid!r}, whose chunk ended its tokens")
            new_token_ids = []
            error = runner_output.errors.get(rid) if runner_output.errors else None
            if error is not None:  # the request cannot go on (its grammar reached a limit); the others do
                request.status, request.stop_reason = RequestStatus.FINISHED_ERROR, error
            for token_id in runner_output.sampled_token_ids[row]:
                request.append_output_token_ids(token_id)
                new_token_ids.append(token_id)
                if self._check_stop(request):
                    break
            if request.is_finished:
                self._free_request(request)
                any_finished = True
            if new_token_ids or request.is_finished:
                entry = logprobs[row] if logprobs is not None else None
                updates.append(
                    RequestUpdate(
                        request_id=rid,
                        new_token_ids=new_token_ids,
                        finished=request.is_finished,
                        status=request.status,
                        stop_reason=request.stop_reason,
                        new_logprobs=[entry] if entry is not None and new_token_ids else None,
                        prompt_logprobs=runner_output.prompt_logprobs.get(rid)
                        if runner_output.prompt_logprobs else None,
                        num_cached_tokens=request.num_cached_prompt_tokens,
                        error=error,
                    )
                )
        if any_finished:
            self.running = [r for r in self.running if not r.is_finished]
        if self.suspects:
            self._clear_suspects()
        return updates

    # ---- failed steps ------------------------------------------------------------------------------------------

    def fail_step(self, scheduler_output: SchedulerOutput, error: BaseException) -> list[RequestUpdate]:
        """The runner raised on `scheduler_output`'s step: nothing it computed counts. Returns the update of
        the sequence that failed when it ran alone (FINISHED_ERROR), or [] when the batch is to be retried
        one suspect at a time (see the module docstring)."""
        if self.in_flight:
            self.land(scheduler_output)
        self.num_failed_steps += 1
        step = [(r, n) for rid, n in scheduler_output.num_scheduled_tokens.items()
                if (r := self.requests.get(rid)) is not None]
        for request, num_new in step:  # the blocks this step was to fill hold nothing a hash may promise
            self.kv_cache_manager.uncache_blocks(request, request.num_computed_tokens - num_new)
        if len(step) == 1:
            request = step[0][0]
            message = f"{type(error).__name__}: {error}"
            logger.error("request %s failed: the model raised on it alone (%s)", request.request_id, message)
            self.running.remove(request)
            request.status, request.stop_reason = RequestStatus.FINISHED_ERROR, message
            self._free_request(request)
            return [RequestUpdate(request_id=request.request_id, new_token_ids=[], finished=True,
                                  status=request.status, stop_reason=message, error=message,
                                  num_cached_tokens=request.num_cached_prompt_tokens)]
        for request, _ in step:
            self.suspects[request.request_id] = max(self.suspects.get(request.request_id, 0),
                                                    request.num_computed_tokens)
        logger.warning("a step of %d sequences failed (%r); retrying them one at a time", len(step), error)
        while self.running:  # tail first, so the waiting queue keeps admission order
            self._preempt(self.running.pop())
        return []

    def _clear_suspects(self) -> None:
        """A suspect that ran alone past the point where its batch failed is cleared; while others remain it
        steps aside (preempted: its computed blocks are prefix hits when it returns)."""
        for request in list(self.running):
            mark = self.suspects.get(request.request_id)
            if mark is not None and request.num_computed_tokens >= mark:
                del self.suspects[request.request_id]
        if self.suspects:
            while (self.running and self.running[-1].request_id not in self.suspects
                   and self.running[-1].request_id not in self.in_flight):
                self._preempt(self.running.pop())

    def _free_computed_encoder_inputs(self, request: Request) -> None:
        encoder_cache = self.encoder_cache_manager
        for idx in encoder_cache.get_cached_input_ids(request):
            f = request.mm_features[idx]
            if f.offset + f.length <= request.num_computed_tokens:
                encoder_cache.free_encoder_input(request, idx)

    def _check_stop(self, request: Request) -> bool:
        """Stop checks after each appended token, in this order: max_tokens; EOS or a stop token id (only
        once min_tokens are out); max_model_len. Sets status and stop_reason."""
        params = request.sampling_params
        num_output = request.num_output_tokens
        if params.max_tokens is not None and num_output >= params.max_tokens:
            request.status = RequestStatus.FINISHED_LENGTH
            return True
        if num_output >= (params.min_tokens or 0):
            last = request.output_token_ids[-1]
            if not params.ignore_eos and request.eos_token_id is not None and last == request.eos_token_id:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = None
                return True
            if params.stop_token_ids and last in params.stop_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = last
                return True
        if request.num_tokens >= self.config.max_model_len:
            request.status = RequestStatus.FINISHED_LENGTH
            return True
        return False

    # ---- metrics ---------------------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache_manager.reset_prefix_cache()

"""The output side: n > 1 fan-out, logprobs, detokenizing, stop strings, `RequestOutput`.

    RequestUpdate (per sequence, from the engine core) ──► OutputProcessor ──► RequestOutput (per request)

A request with `n > 1` runs as n independent sequences ("children", ids `{i}_{request_id}`; with a seed, child
i uses seed + i). Each child has its own detokenizer; a child that hits a stop string is reported back so the
core stops it. A request's output gathers all its children and is finished when all of them are. Only what
the updates carry is read here, never the scheduler's live `Request`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fovea.engine.detokenizer import IncrementalDetokenizer
from fovea.engine.request import Request, RequestStatus
from fovea.engine.scheduler import RequestUpdate
from fovea.outputs import CompletionOutput, Logprob, RequestOutput

_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


def fan_out(request: Request) -> list[Request]:
    """The sequences that run for `request`: itself when n == 1, else n children with their own params."""
    params = request.sampling_params
    if params.n == 1:
        return [request]
    children = []
    for index in range(params.n):
        child_params = params.clone()
        child_params.n = 1
        if params.seed is not None:
            child_params.seed = params.seed + index
        children.append(Request(
            request_id=f"{index}_{request.request_id}", prompt_token_ids=request.prompt_token_ids,
            sampling_params=child_params, eos_token_id=request.eos_token_id, mm_features=request.mm_features,
            prompt=request.prompt, arrival_index=request.arrival_index, mrope_positions=request.mrope_positions,
            mrope_position_delta=request.mrope_position_delta, lora_request=request.lora_request,
            encoder_prompt_token_ids=request.encoder_prompt_token_ids,
        ))
    return children


@dataclass(eq=False)
class _CompletionState:
    """Output side of one sequence (one of a request's `n`)."""

    index: int
    detokenizer: IncrementalDetokenizer
    logprobs: list | None
    cumulative_logprob: float | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0


@dataclass(eq=False)
class _ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[_CompletionState] = field(default_factory=list)
    sequence_ids: list[str] = field(default_factory=list)  # the core's ids of the children, in order
    prompt_logprobs: list | None = None  # [None, entry for token 1, ...] once the first child delivered them

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children)


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._parents: dict[str, _ParentState] = {}
        self._children: dict[str, tuple[_ParentState, _CompletionState]] = {}  # sequence id -> its states

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._parents

    def get_num_unfinished_requests(self) -> int:
        return len(self._parents)

    def add_request(self, request: Request, sequences: list[Request]) -> None:
        """Track `request`, which runs as `sequences` (see `fan_out`)."""
        # an encoder-decoder's output reports the prompt the user gave (the encoder's); its text continues the
        # decoder's own prompt, so that stays the detokenizer's context
        shown_ids = request.encoder_prompt_token_ids if request.encoder_prompt_token_ids is not None \
            else request.prompt_token_ids
        parent = _ParentState(request.request_id, request.prompt, shown_ids)
        for index, seq in enumerate(sequences):
            params = seq.sampling_params
            child = _CompletionState(
                index=index,
                detokenizer=IncrementalDetokenizer(self.tokenizer, params, request.prompt_token_ids),
                logprobs=[] if params.logprobs is not None else None,
                cumulative_logprob=0.0 if params.logprobs is not None else None,
            )
            parent.children.append(child)
            parent.sequence_ids.append(seq.request_id)
            self._children[seq.request_id] = (parent, child)
        self._parents[request.request_id] = parent

    def abort_requests(self, request_ids: list[str]) -> list[str]:
        """Forget these requests; returns the ids of their sequences, for the core to abort."""
        sequence_ids = []
        for request_id in request_ids:
            parent = self._parents.pop(request_id, None)
            if parent is not None:
                sequence_ids += self._forget(parent)
        return sequence_ids

    def _forget(self, parent: _ParentState) -> list[str]:
        for sid in parent.sequence_ids:
            self._children.pop(sid, None)
        return parent.sequence_ids

    def process_updates(self, updates: list[RequestUpdate]) -> tuple[list[RequestOutput], list[str]]:
        """One step's updates -> an output for every request that changed, and the sequences a stop string
        ended (the core must stop them: the scheduler does not see text)."""
        touched: dict[str, _ParentState] = {}
        stopped_by_string = []
        for update in updates:
            states = self._children.get(update.request_id)
            if states is None:
                continue
            parent, state = states
            state.num_cached_tokens = update.num_cached_tokens
            if update.prompt_logprobs is not None and parent.prompt_logprobs is None:
                # n > 1: every child computed them; they are the same prompt's, the first is kept
                for entry in update.prompt_logprobs:
                    for token_id, logprob in (entry or {}).items():
                        if logprob.decoded_token is None:
                            logprob.decoded_token = self.tokenizer.decode([token_id])
                parent.prompt_logprobs = [None, *update.prompt_logprobs]
            for entry in update.new_logprobs or ():
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
            touched[parent.request_id] = parent
        outputs = []
        for parent in touched.values():
            outputs.append(self._make_output(parent))
            if parent.finished:
                del self._parents[parent.request_id]
                self._forget(parent)
        return outputs, stopped_by_string

    def _add_logprobs(self, state: _CompletionState, entry: dict[int, Logprob], new_token_ids: list[int]) -> None:
        for token_id, logprob in entry.items():
            if logprob.decoded_token is None:
                logprob.decoded_token = self.tokenizer.decode([token_id])
        state.logprobs.append(entry)
        sampled = new_token_ids[0] if new_token_ids else None
        if sampled in entry:
            state.cumulative_logprob += entry[sampled].logprob

    @staticmethod
    def _make_output(parent: _ParentState) -> RequestOutput:
        completions = [
            CompletionOutput(
                index=child.index,
                text=child.detokenizer.output_text,
                token_ids=list(child.detokenizer.output_token_ids),
                cumulative_logprob=child.cumulative_logprob,
                logprobs=child.logprobs,
                finish_reason=child.finish_reason,
                stop_reason=child.stop_reason,
            )
            for child in parent.children
        ]
        return RequestOutput(request_id=parent.request_id, prompt=parent.prompt,
                             prompt_token_ids=parent.prompt_token_ids, outputs=completions,
                             finished=parent.finished, prompt_logprobs=parent.prompt_logprobs,
                             num_cached_tokens=parent.children[0].num_cached_tokens)

"""Beam search over the engine: transformers' rules, beams forked in the KV cache.

    prompt ──► root sequence (prefill once, image encoded once) ──► top 2k log-probs
    each step: BeamGroup.step (transformers' selection) ──► k forks ──► the engine computes one token each

Every beam's next-token distribution comes from an engine sequence that computes one token and then *holds* its KV
blocks (`Request.hold_kv`). The beams chosen for the next step are forks of those sequences (`Request.fork_parent`):
the scheduler gives a fork its parent's full blocks by reference and a copy of the partial last block
(copy-on-write), so no beam ever re-runs the prompt. Sequences no beam continues are released.

The selection is transformers' `GenerationMixin._beam_search` (do_sample=False, one EOS token), restated for one
prompt on the few candidates that can win: the top 2k continuations over all beams (a beam's own top 2k is all it
can contribute), the best k not ending (EOS, or max_tokens reached) keep running, those among the first k that end
join the k finished hypotheses ranked by cum_logprob / generated_len ** length_penalty, and the search stops by
transformers' `early_stopping` rule (False: when the best running beam, scored at its current length, cannot beat
the worst finished one). Encoder-decoder models (T5, BLIP-2 / InstructBLIP over Flan-T5) search the same way over the decoder: the root runs
the encoder once and takes the request's cross blocks, and every fork shares them by reference with the parent's
full decoder blocks (fovea.engine.scheduler_forks), so no beam re-runs the encoder. A sequence's `tokens` are then
the decoder's ([decoder_start_token_id] + generated, transformers' `sequences`), and the RequestOutput's
`prompt_token_ids` the encoder's prompt, as `generate` reports it. vLLM's own beam search differs (it ranks every candidate each step with its length
penalty and keeps only unfinished beams in the running set); fovea follows transformers, as issue 20 asks.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from fovea.engine.request import Request, RequestStatus
from fovea.outputs import BeamSearchOutput, BeamSearchSequence, CompletionOutput, Logprob, RequestOutput
from fovea.sampling_params import BeamSearchParams, SamplingParams

_NEG = -1.0e9  # transformers' "cannot be chosen" offset


@dataclass(slots=True)
class Beam:
    seq_id: str | None  # the engine sequence computing its next-token distribution (None once finished)
    token_ids: list[int]  # generated so far
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float  # transformers' running beam score (sum of log-probs, no length penalty)


@dataclass(slots=True)
class Continuation:
    """A running beam for the next step: `parent` (a current beam) extended by `token_id`."""

    parent: Beam
    beam: Beam


@dataclass(slots=True)
class _Finished:
    score: float
    is_finished: bool
    beam: Beam | None


@dataclass
class BeamGroup:
    """One prompt's beams under transformers' rules; knows nothing about the engine."""

    params: BeamSearchParams
    eos_token_id: int | None
    max_tokens: int
    running: list[Beam] = field(default_factory=list)
    finished: list[_Finished] = field(default_factory=list)
    heuristic_unsatisfied: bool = True  # transformers' is_early_stop_heuristic_unsatisfied
    done: bool = False

    def __post_init__(self) -> None:
        self.finished = [_Finished(_NEG, False, None) for _ in range(self.params.beam_width)]

    def step(self, distributions: dict[str, dict[int, Logprob]]) -> list[Continuation]:
        """Advance by one token given each running beam's top log-probs; returns the beams to run next
        (empty when the search is done)."""
        k, params = self.params.beam_width, self.params
        gen_len = len(self.running[0].token_ids) + 1
        candidates = sorted(
            ((beam.cum_logprob + lp.logprob, i, token, lp) for i, beam in enumerate(self.running)
             for token, lp in distributions[beam.seq_id].items()),
            key=lambda c: -c[0])[:2 * k]
        hits = [(not params.ignore_eos and token == self.eos_token_id) or gen_len >= self.max_tokens
                for _, _, token, _ in candidates]
        grown = []
        for score, i, token, _ in candidates:
            parent = self.running[i]
            grown.append(Beam(None, [*parent.token_ids, token],
                              [*parent.logprobs, distributions[parent.seq_id]], score))

        # running: the best k continuations that did not end (ended ones sink by -1e9, as in transformers)
        order = sorted(range(len(candidates)), key=lambda j: -(candidates[j][0] + (_NEG if hits[j] else 0.0)))[:k]
        nxt = [Continuation(self.running[candidates[j][1]], grown[j]) for j in order]
        running_scores = [candidates[j][0] + (_NEG if hits[j] else 0.0) for j in order]

        # finished: the first k candidates that ended compete with the kept hypotheses
        beams_full = all(f.is_finished for f in self.finished) and params.early_stopping is True
        merged = list(self.finished)
        for j, (score, _, _, _) in enumerate(candidates):
            just_finished = hits[j] and j < k
            adjusted = score / gen_len ** params.length_penalty
            adjusted += (_NEG if beams_full else 0.0) + (0.0 if self.heuristic_unsatisfied else _NEG)
            adjusted += 0.0 if just_finished else _NEG
            merged.append(_Finished(adjusted, just_finished, grown[j]))
        self.finished = sorted(merged, key=lambda f: -f.score)[:k]

        # transformers' stopping rule
        if params.early_stopping == "never" and params.length_penalty > 0.0:
            best_len = self.max_tokens
        else:
            best_len = gen_len
        best_possible = running_scores[0] / best_len ** params.length_penalty
        all_finished = all(f.is_finished for f in self.finished)
        worst_finished = min(f.score for f in self.finished) if all_finished else _NEG
        self.heuristic_unsatisfied = self.heuristic_unsatisfied and best_possible > worst_finished
        exists_open_beam = not (all_finished and params.early_stopping is True)
        valid_continuations = not all(hits)
        if not (self.heuristic_unsatisfied and exists_open_beam and valid_continuations):
            self.done = True
            return []
        return nxt

    def results(self) -> list[tuple[float, Beam]]:
        """The finished hypotheses, best first, with their length-penalised scores."""
        return [(f.score, f.beam) for f in self.finished if f.is_finished]


def sequence_params(params: BeamSearchParams) -> SamplingParams:
    """What every beam's engine sequence runs with: one greedy token, reporting its top 2k raw log-probs (the token
    it samples is not used)."""
    return SamplingParams(max_tokens=1, temperature=0.0, logprobs=2 * params.beam_width, ignore_eos=True)


@dataclass(eq=False)
class _Search:
    request_id: str
    root: Request  # the prompt's sequence: its ids, features and positions are every fork's
    params: BeamSearchParams
    group: BeamGroup
    num_blocks: int  # the most KV blocks it may hold at once
    keep_output: bool
    started: bool = False
    sequences: set[str] = field(default_factory=set)  # its live or held engine sequences
    error: str | None = None


class BeamSearchManager:
    """The engine's beam searches (LLMEngine owns one): starts them while their worst cases fit the KV pool together
    (so searches never deadlock on held blocks), reads their sequences' updates out of each step, forks and releases
    sequences, and reports each search once it is done. Other requests' updates pass through untouched."""

    def __init__(self, core, tokenizer):
        self.core, self.tokenizer = core, tokenizer
        self.searches: dict[str, _Search] = {}  # unfinished, in arrival order
        self.owner: dict[str, _Search] = {}  # engine sequence id -> its search
        self.held: set[str] = set()
        self.distributions: dict[str, dict[int, Logprob]] = {}
        self.outputs: dict[str, BeamSearchOutput] = {}  # finished searches added with keep_output
        self._counter = itertools.count()

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.searches

    def __len__(self) -> int:
        return len(self.searches)

    def add(self, request_id: str, root: Request, params: BeamSearchParams, max_model_len: int,
            keep_output: bool = False) -> None:
        """Queue a search whose prompt `root` the input processor made (with `sequence_params(params)`); ValueError
        if it has no room to generate or could never fit the KV pool."""
        room = max_model_len - root.num_prompt_tokens
        if room < 1:
            raise ValueError(f"its {root.num_prompt_tokens} prompt tokens leave no room to generate within "
                             f"max_model_len={max_model_len}")
        max_tokens = min(params.max_tokens, room)
        num_blocks = _blocks_needed(self.core.scheduler.kv_cache_manager, root.num_prompt_tokens,
                                    params.beam_width, max_tokens, root.num_encoder_tokens)
        root.hold_kv = True
        group = BeamGroup(params, None if params.ignore_eos else root.eos_token_id, max_tokens)
        group.running = [Beam(root.request_id, [], [], 0.0)]
        self.searches[request_id] = _Search(request_id, root, params, group, num_blocks, keep_output)

    def abort(self, request_ids) -> None:
        for request_id in request_ids:
            search = self.searches.pop(request_id, None)
            if search is not None:
                self._drop(search)
            self.outputs.pop(request_id, None)

    def start(self) -> None:
        """Start queued searches, in order, while all started ones' worst cases fit the pool together."""
        pool = self.core.scheduler.kv_cache_manager.num_usable_blocks
        in_use = sum(s.num_blocks for s in self.searches.values() if s.started)
        for search in self.searches.values():
            if search.started:
                continue
            if in_use + search.num_blocks > pool:
                break
            self.core.add_requests([search.root])
            search.started = True
            in_use += search.num_blocks
            self._own(search, search.root.request_id)

    def process(self, updates: list) -> tuple[list, list[RequestOutput]]:
        """Take the beam sequences' updates out of one step's; returns the others and an output per search that
        ended (RequestOutput, vLLM's server shape: one completion per beam, best first)."""
        others = []
        for update in updates:
            search = self.owner.get(update.request_id)
            if search is None:
                others.append(update)
            elif update.status in (RequestStatus.FINISHED_ERROR, RequestStatus.FINISHED_ABORTED):
                search.error = search.error or (update.error or f"a beam was {update.status.name.lower()}")
            elif update.finished:
                self.held.add(update.request_id)
                self.distributions[update.request_id] = update.new_logprobs[0]
        finished = []
        for search in list(self.searches.values()):
            group = search.group
            if search.error is None and search.started and \
                    all(b.seq_id in self.distributions for b in group.running):
                self._advance(search)
            if search.error is not None or group.done:
                del self.searches[search.request_id]
                self._drop(search)
                finished.append(self._request_output(search))
        return others, finished

    def _own(self, search: _Search, seq_id: str) -> None:
        self.owner[seq_id] = search
        search.sequences.add(seq_id)

    def _disown(self, search: _Search, seq_ids: list[str]) -> None:
        for seq_id in seq_ids:
            self.owner.pop(seq_id, None)
            self.distributions.pop(seq_id, None)
            self.held.discard(seq_id)
            search.sequences.discard(seq_id)

    def _advance(self, search: _Search) -> None:
        root, group = search.root, search.group
        old = [b.seq_id for b in group.running]
        continuations = group.step(self.distributions)
        forks = []
        for cont in continuations:
            cont.beam.seq_id = f"{root.request_id}.{next(self._counter)}"
            # the parent sequence computed the prompt and the parent's tokens: the fork computes one more
            forks.append(Request(
                request_id=cont.beam.seq_id, prompt_token_ids=[*root.prompt_token_ids, *cont.beam.token_ids],
                sampling_params=root.sampling_params, eos_token_id=root.eos_token_id, mm_features=root.mm_features,
                arrival_index=root.arrival_index, mrope_positions=root.mrope_positions,
                mrope_position_delta=root.mrope_position_delta, lora_request=root.lora_request,
                encoder_prompt_token_ids=root.encoder_prompt_token_ids, hold_kv=True, fork_parent=cont.parent.seq_id))
        group.running = [c.beam for c in continuations]
        if forks:
            self.core.add_requests(forks)
            for fork in forks:
                self._own(search, fork.request_id)
        self.core.scheduler.release_held(old)  # freed once the forks took their copies
        self._disown(search, old)

    def _drop(self, search: _Search) -> None:
        """Withdraw every sequence of a search that ended or was aborted."""
        ids = list(search.sequences)
        self.core.abort_requests([i for i in ids if i not in self.held])
        self.core.scheduler.release_held([i for i in ids if i in self.held])
        self._disown(search, ids)

    def _request_output(self, search: _Search) -> RequestOutput:
        root = search.root
        if search.error is not None:
            completions = [CompletionOutput(index=0, text="", token_ids=[], finish_reason="error",
                                            stop_reason=search.error)]
        else:
            output = _output(self.tokenizer, search.group, root, search.params)
            if search.keep_output:
                self.outputs[search.request_id] = output
            n = len(root.prompt_token_ids)
            completions = [CompletionOutput(index=i, text=s.text, token_ids=s.tokens[n:],
                                            cumulative_logprob=s.cum_logprob, finish_reason=s.finish_reason)
                           for i, s in enumerate(output.sequences)]
        # an encoder-decoder's prompt is the encoder's, as generate() reports it
        prompt_ids = root.prompt_token_ids if root.encoder_prompt_token_ids is None else root.encoder_prompt_token_ids
        return RequestOutput(request_id=search.request_id, prompt=root.prompt, prompt_token_ids=prompt_ids,
                             outputs=completions, finished=True)


def _blocks_needed(kv, num_prompt_tokens: int, beam_width: int, max_tokens: int, num_encoder_tokens: int = 0) -> int:
    """The most KV blocks one prompt's search may hold at once (ValueError if over the pool): while one step's
    forks are admitted, the k sequences they fork from still hold their blocks, so 2k sequences may hold their own
    blocks past the prompt's full ones. An encoder-decoder search adds its cross blocks once (every beam shares
    them)."""
    bs = kv.block_size
    own = -(-(num_prompt_tokens % bs + max_tokens) // bs)
    needed = num_prompt_tokens // bs + 2 * beam_width * own + -(-num_encoder_tokens // bs)
    if needed > kv.num_usable_blocks:
        raise ValueError(f"beam search with beam_width={beam_width} and max_tokens={max_tokens} may "
                         f"hold {needed} KV blocks at once, more than the pool's {kv.num_usable_blocks}; lower them or "
                         f"give the engine more KV memory")
    return needed


def _output(tokenizer, group: BeamGroup, root: Request, params: BeamSearchParams) -> BeamSearchOutput:
    sequences = []
    for score, beam in group.results():
        ended_on_eos = not params.ignore_eos and beam.token_ids and beam.token_ids[-1] == root.eos_token_id
        text_ids = beam.token_ids[:-1] if ended_on_eos and not params.include_stop_str_in_output else beam.token_ids
        sequences.append(BeamSearchSequence(
            tokens=[*root.prompt_token_ids, *beam.token_ids], logprobs=beam.logprobs,
            cum_logprob=beam.cum_logprob, score=score,
            text=tokenizer.decode(text_ids, skip_special_tokens=True),
            finish_reason="stop" if ended_on_eos else "length", lora_request=root.lora_request))
    return BeamSearchOutput(sequences)

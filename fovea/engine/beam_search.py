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
the worst finished one). vLLM's own beam search differs (it ranks every candidate each step with its length
penalty and keeps only unfinished beams in the running set); fovea follows transformers, as issue 20 asks.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from fovea.engine.request import Request, RequestStatus
from fovea.outputs import BeamSearchOutput, BeamSearchSequence, Logprob
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


_search_ids = itertools.count()


def beam_search(engine, prompts: Sequence, params: BeamSearchParams, lora_requests: Sequence) -> list[BeamSearchOutput]:
    """Run every prompt's beam search to the end on `engine` (an idle `LLMEngine`: its core's updates are read
    here, not by the output processor). Raises ValueError for a bad prompt (nothing left queued), RuntimeError
    if the model failed on a beam."""
    core, k = engine.engine_core, params.beam_width
    # greedy one-token sequences that report their top 2k raw log-probs; the token they "sample" is unused
    seq_params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=2 * k, ignore_eos=True)
    search = next(_search_ids)
    roots, groups, needs = [], [], []
    for i, (prompt, lora) in enumerate(zip(prompts, lora_requests)):
        if lora is not None:
            engine.add_lora(lora)
        try:
            root = engine.input_processor.process(f"beam{search}-{i}", prompt, seq_params, next(engine._arrivals))
        except ValueError as err:
            raise ValueError(f"prompt {i}: {err}") from err
        room = engine.max_model_len - root.num_prompt_tokens
        if room < 1:
            raise ValueError(f"prompt {i}: its {root.num_prompt_tokens} tokens leave no room to generate within "
                             f"max_model_len={engine.max_model_len}")
        root.hold_kv, root.lora_request = True, lora
        needs.append(_blocks_needed(engine, root.num_prompt_tokens, k, min(params.max_tokens, room), i))
        roots.append(root)
        group = BeamGroup(params, None if params.ignore_eos else root.eos_token_id, min(params.max_tokens, room))
        group.running = [Beam(root.request_id, [], [], 0.0)]
        groups.append(group)
    owner: dict[str, BeamGroup] = {}  # live or held sequence -> its group
    root_of = {id(group): root for root, group in zip(roots, groups)}
    live: set[str] = set()  # queued or running sequences
    held: set[str] = set()
    distributions: dict[str, dict[int, Logprob]] = {}
    counter = itertools.count()
    # prompts start while their worst cases fit the pool together, so no two searches can deadlock on it
    num_started, pool = 0, engine.scheduler.kv_cache_manager.num_usable_blocks
    try:
        while not all(g.done for g in groups):
            blocks_in_use = sum(need for need, g in zip(needs[:num_started], groups) if not g.done)
            first = num_started
            while num_started < len(roots) and blocks_in_use + needs[num_started] <= pool:
                blocks_in_use += needs[num_started]
                num_started += 1
            if num_started > first:
                core.add_requests(roots[first:num_started])
                for root, group in zip(roots[first:num_started], groups[first:num_started]):
                    owner[root.request_id] = group
                    live.add(root.request_id)
            updates = core.step()
            if not updates and not core.scheduler.running and core.scheduler.waiting:
                raise RuntimeError("beam search made no progress: the KV pool is held by other requests")
            for update in updates:
                if update.request_id not in owner:
                    continue
                if update.status in (RequestStatus.FINISHED_ERROR, RequestStatus.FINISHED_ABORTED):
                    raise RuntimeError(f"beam search: the model failed on a beam: {update.error or update.status.name}")
                if update.finished:
                    live.discard(update.request_id)
                    held.add(update.request_id)
                    distributions[update.request_id] = update.new_logprobs[0]
            for group in groups:
                if group.done or any(b.seq_id not in distributions for b in group.running):
                    continue
                root = root_of[id(group)]
                old = [b.seq_id for b in group.running]
                continuations = group.step(distributions)
                forks = []
                for cont in continuations:
                    cont.beam.seq_id = f"{root.request_id}.{next(counter)}"
                    # the parent sequence computed the prompt and the parent's tokens: the fork computes one more
                    forks.append(Request(
                        request_id=cont.beam.seq_id, prompt_token_ids=[*root.prompt_token_ids, *cont.beam.token_ids],
                        sampling_params=seq_params, eos_token_id=root.eos_token_id, mm_features=root.mm_features,
                        arrival_index=root.arrival_index, mrope_positions=root.mrope_positions,
                        mrope_position_delta=root.mrope_position_delta, lora_request=root.lora_request,
                        hold_kv=True, fork_parent=cont.parent.seq_id))
                group.running = [c.beam for c in continuations]
                core.add_requests(forks)
                for fork in forks:
                    owner[fork.request_id] = group
                    live.add(fork.request_id)
                core.scheduler.release_held(old)  # freed once the forks took their copies
                held.difference_update(old)
                for seq_id in old:
                    distributions.pop(seq_id, None)
                    del owner[seq_id]
    finally:
        if live:
            core.abort_requests(list(live))
        core.scheduler.release_held(list(held))
    return [_output(engine, group, root, params) for root, group in zip(roots, groups)]


def _blocks_needed(engine, num_prompt_tokens: int, beam_width: int, max_tokens: int, index: int) -> int:
    """The most KV blocks one prompt's search may hold at once (ValueError if over the pool): while one step's
    forks are admitted, the k sequences they fork from still hold their blocks, so 2k sequences may hold their own
    blocks past the prompt's full ones."""
    kv = engine.scheduler.kv_cache_manager
    bs = kv.block_size
    own = -(-(num_prompt_tokens % bs + max_tokens) // bs)
    needed = num_prompt_tokens // bs + 2 * beam_width * own
    if needed > kv.num_usable_blocks:
        raise ValueError(f"prompt {index}: beam search with beam_width={beam_width} and max_tokens={max_tokens} may "
                         f"hold {needed} KV blocks at once, more than the pool's {kv.num_usable_blocks}; lower them or "
                         f"give the engine more KV memory")
    return needed


def _output(engine, group: BeamGroup, root: Request, params: BeamSearchParams) -> BeamSearchOutput:
    tokenizer = engine.tokenizer
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

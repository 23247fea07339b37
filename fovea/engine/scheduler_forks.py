"""Beam search's side of the scheduler: sequences that finished with `hold_kv` keep their KV blocks (`held`) so
that forks can start from them; a fork is admitted with its parent's full blocks shared and its partial one
copied, and a held sequence is freed once released and no queued fork still needs it. An encoder-decoder fork
shares its parent's cross blocks too and does not run the encoder (it is not in `scheduled_encoder_prompts`); if it
is preempted later it becomes an ordinary request and recomputes its encoder into cross blocks of its own.

`BeamForks` is a part of `Scheduler` (scheduler.py), kept apart by concern: it reads and writes the scheduler's
`held`, `num_pending_forks`, `release_requested`, `waiting`, `running` and KV cache manager.
"""
from __future__ import annotations

from collections.abc import Iterable

from fovea.engine.request import Request, RequestStatus
from fovea.engine.scheduler_output import NewRequestData, SchedulerOutput


class BeamForks:
    def release_held(self, request_ids: str | Iterable[str]) -> None:
        """Free the KV blocks of held sequences (unknown ids are ignored). A sequence that queued forks still
        need is freed at the end of the step that admits the last of them, after its blocks were copied."""
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        for rid in request_ids:
            if rid not in self.held:
                continue
            self.release_requested.add(rid)
            if not self.num_pending_forks.get(rid):
                self._release(rid)

    def _release(self, rid: str) -> None:
        self.kv_cache_manager.free(self.held.pop(rid))
        self.release_requested.discard(rid)
        self.num_pending_forks.pop(rid, None)

    def _fork_done(self, parent_id: str) -> None:
        self.num_pending_forks[parent_id] -= 1

    def _release_forked(self) -> None:
        for rid in [r for r in self.release_requested if not self.num_pending_forks.get(r)]:
            self._release(rid)

    def _admit_fork(self, out: SchedulerOutput, request: Request) -> bool:
        """Admit a beam fork: its computed tokens' KV comes from its held parent (shared full blocks, a copy of
        the partial one), so only its last token is computed. False (nothing changed) when the pool is short."""
        parent = self.held[request.fork_parent]
        request.num_computed_tokens = request.num_tokens - 1
        forked = self.kv_cache_manager.fork(request, parent, 1)
        if forked is None:
            request.num_computed_tokens = 0
            return False
        _, copy = forked
        if copy is not None:
            out.blocks_to_copy.append(copy)
        self.waiting.popleft()
        self._fork_done(request.fork_parent)
        request.fork_parent = None  # from now on an ordinary sequence (a preemption recomputes it)
        num_computed = request.num_tokens - 1
        request.num_cached_prompt_tokens = num_computed
        out.scheduled_new_reqs.append(NewRequestData(
            req_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
            sampling_params=request.sampling_params, eos_token_id=request.eos_token_id,
            mm_features=request.mm_features, mrope_positions=request.mrope_positions,
            mrope_position_delta=request.mrope_position_delta,
            block_ids=self.kv_cache_manager.get_block_ids(request.request_id),
            num_computed_tokens=num_computed, lora_request=request.lora_request,
            encoder_prompt_token_ids=request.encoder_prompt_token_ids,
            cross_block_ids=self.kv_cache_manager.get_cross_block_ids(request.request_id),
        ))
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        self._commit(out, request, 1, [], [])
        return True

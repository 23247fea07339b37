"""Shared helpers for the engine bookkeeping tests (pure Python, no torch)."""
from __future__ import annotations

from dataclasses import dataclass, field

from fovea.engine.request import MultiModalFeature, Request


@dataclass
class Params:
    """The sampling fields the scheduler reads, named as in vLLM's SamplingParams."""

    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)


def image(offset: int, length: int, mm_hash: str, num_embeds: int | None = None) -> MultiModalFeature:
    is_embed = None if num_embeds is None else [i < num_embeds for i in range(length)]
    return MultiModalFeature("image", offset, length, mm_hash, data={}, is_embed=is_embed)


def make_request(
    request_id: str,
    prompt: list[int] | int,
    *,
    mm: list[MultiModalFeature] | None = None,
    eos: int | None = None,
    **params,
) -> Request:
    """`prompt` is the token ids, or a length (tokens 0..n-1)."""
    tokens = list(range(prompt)) if isinstance(prompt, int) else list(prompt)
    return Request(request_id, tokens, Params(**params), eos_token_id=eos, mm_features=list(mm or []))


@dataclass
class Scheduled:
    """One request of a SchedulerOutput, read back with its whole block table (for assertions)."""

    request: Request
    num_computed_tokens: int
    num_new_tokens: int
    is_new: bool  # first scheduled (NewRequestData) or resumed after preemption
    block_ids: list[int]
    encoder_inputs: list[int]


class StepView:
    """A SchedulerOutput read per request, right after `schedule()`, checked against the scheduler's own state:
    a new request carries its prompt and whole block table, a running one the blocks it gained (the tail of its
    table), a resumed one its whole new table; every computed-token count adds up."""

    def __init__(self, sched, out):
        self.out = out
        new = {d.req_id: d for d in out.scheduled_new_reqs}
        cached = out.scheduled_cached_reqs
        row = {rid: i for i, rid in enumerate(cached.req_ids)}
        assert not set(new) & set(row) and set(new) | set(row) == set(out.num_scheduled_tokens)
        self.scheduled = []
        for rid, n in out.num_scheduled_tokens.items():
            request = sched.requests[rid]
            table = sched.kv_cache_manager.get_block_ids(rid)
            if rid in new:
                data = new[rid]
                assert data.block_ids == table and data.prompt_token_ids == request.prompt_token_ids
                assert data.mm_features is request.mm_features
                computed, is_new = data.num_computed_tokens, True
            else:
                i = row[rid]
                computed, is_new = cached.num_computed_tokens[i], cached.resumed_from_preemption[i]
                gained = cached.new_block_ids[i]
                assert gained == (table if is_new else table[len(table) - len(gained):])
            assert computed + n == request.num_computed_tokens
            self.scheduled.append(Scheduled(request, computed, n, is_new, table,
                                            list(out.scheduled_encoder_inputs.get(rid, []))))
        assert out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens.values())
        self.num_scheduled_tokens = out.total_num_scheduled_tokens

    def __getattr__(self, name):
        return getattr(self.out, name)


def runner_output(sampled: dict[str, list[int]]):
    """A ModelRunnerOutput sampling `sampled[request_id]` for each listed request."""
    from fovea.outputs import ModelRunnerOutput

    return ModelRunnerOutput(list(sampled), [list(t) for t in sampled.values()])

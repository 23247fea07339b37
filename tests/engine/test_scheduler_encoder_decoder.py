"""Encoder-decoder requests in the scheduler, to the block: cross blocks taken at admission with the decoder's,
held for the request's life, freed on finish, abort and preemption (and taken anew on resumption, when the
encoder runs again); the encoder budget; no prefix caching. Pure Python, no torch."""
import pytest

from fovea.engine.request import Request, RequestStatus
from fovea.engine.scheduler import Scheduler, SchedulerConfig
from tests.engine import Params, image, runner_output

START = 0  # decoder_start_token_id


def scheduler(**overrides) -> Scheduler:
    kwargs = dict(num_blocks=13, block_size=4, max_num_seqs=8, max_num_batched_tokens=16, max_model_len=32,
                  max_num_encoder_input_tokens=40, encoder_cache_size=40)
    kwargs.update(overrides)
    return Scheduler(SchedulerConfig(**kwargs))


def encdec(request_id: str, num_encoder: int, mm=None, **params) -> Request:
    return Request(request_id, [START], Params(**params), mm_features=list(mm or []),
                   encoder_prompt_token_ids=list(range(10, 10 + num_encoder)))


def step(sched: Scheduler, token: int = 7):
    out = sched.schedule()
    sampled = {rid: [token] for rid in out.num_scheduled_tokens}
    return out, sched.update_from_output(out, runner_output(sampled))


def test_cross_blocks_taken_at_admission_and_freed_on_finish():
    sched = scheduler()
    kv = sched.kv_cache_manager
    sched.add_request(encdec("a", 9, max_tokens=3))  # 3 cross blocks, then 1 decoder block
    out, _ = step(sched)
    assert out.scheduled_encoder_prompts == ["a"]
    new = out.scheduled_new_reqs[0]
    assert new.encoder_prompt_token_ids == list(range(10, 19)) and new.prompt_token_ids == [START]
    assert new.cross_block_ids == [1, 2, 3] and new.block_ids == [4]
    assert kv.num_free_blocks == 12 - 4
    out, _ = step(sched)  # a decode step: no encoder, the cross blocks stay
    assert out.scheduled_encoder_prompts == [] and kv.get_cross_block_ids("a") == [1, 2, 3]
    assert out.scheduled_cached_reqs.new_cross_block_ids == [[]]
    step(sched)
    assert "a" not in sched.requests and kv.num_free_blocks == 12 and kv.get_cross_block_ids("a") == []


def test_abort_frees_cross_blocks():
    sched = scheduler()
    sched.add_request(encdec("a", 5, max_tokens=8))
    step(sched)
    sched.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert sched.kv_cache_manager.num_free_blocks == 12


def test_preemption_frees_cross_blocks_and_resumption_reencodes():
    # 12 usable blocks: a takes 4 cross + 1, b 4 cross + 1; decoding to 9 tokens each needs 3 per request
    sched = scheduler()
    kv = sched.kv_cache_manager
    sched.add_request(encdec("a", 16, max_tokens=12))
    sched.add_request(encdec("b", 16, max_tokens=12))
    out, _ = step(sched)
    assert out.scheduled_encoder_prompts == ["a", "b"]
    preempted = []
    for _ in range(12):
        out, _ = step(sched)
        preempted += out.preempted_request_ids
        if out.scheduled_encoder_prompts:
            break
    assert preempted == ["b"]
    assert sched.num_preemptions == 1
    while "a" in sched.requests:
        out, _ = step(sched)
        if out.scheduled_encoder_prompts:  # b is back: a new cross table, the encoder runs again
            cached = out.scheduled_cached_reqs
            i = cached.req_ids.index("b")
            assert cached.resumed_from_preemption[i] and cached.new_cross_block_ids[i] == kv.get_cross_block_ids("b")
            assert len(kv.get_cross_block_ids("b")) == 4
            assert out.num_scheduled_tokens["b"] == sched.requests["b"].num_computed_tokens  # recompute all
    while sched.requests:
        step(sched)
    assert kv.num_free_blocks == 12


def test_encoder_budget_limits_admissions_per_step():
    sched = scheduler(max_num_encoder_input_tokens=20, encoder_cache_size=20)
    for rid in "abc":
        sched.add_request(encdec(rid, 8, max_tokens=2))
    out, _ = step(sched)
    assert out.scheduled_encoder_prompts == ["a", "b"]  # 8 + 8, a third would be 24 > 20
    out, _ = step(sched)
    assert out.scheduled_encoder_prompts == ["c"]


def test_images_encoded_with_the_prompt_and_released_after():
    sched = scheduler()
    sched.add_request(encdec("a", 12, mm=[image(0, 8, "img")], max_tokens=3))
    out, _ = step(sched)
    assert out.scheduled_encoder_inputs == {"a": [0]} and out.scheduled_encoder_prompts == ["a"]
    out, _ = step(sched)
    assert out.freed_mm_hashes == ["img"]
    assert sched.encoder_cache_manager.num_free_slots == 40


@pytest.mark.parametrize("request_kw, message", [
    (dict(num_encoder=41), "max_num_encoder_input_tokens=40"),
    (dict(num_encoder=0), "empty encoder prompt"),
    (dict(num_encoder=40, max_tokens=16), "cross-attention blocks"),
])
def test_requests_that_could_never_run_are_refused(request_kw, message):
    sched = scheduler(max_model_len=64)
    num_encoder = request_kw.pop("num_encoder")
    with pytest.raises(ValueError, match=message):
        sched.add_request(encdec("a", num_encoder, **request_kw))


def test_no_prefix_caching_for_encoder_decoder():
    sched = scheduler(num_blocks=30)
    sched.add_request(encdec("a", 4, max_tokens=10))
    while sched.requests:
        step(sched)
    sched.add_request(encdec("b", 4, max_tokens=10))
    out, _ = step(sched)
    assert out.scheduled_new_reqs[0].num_computed_tokens == 0
    assert not sched.kv_cache_manager.block_pool.cached_blocks


def encdec_fork(request_id: str, parent: Request, token: int) -> Request:
    child = Request(request_id, [*parent.prompt_token_ids, token], Params(max_tokens=1),
                    encoder_prompt_token_ids=parent.encoder_prompt_token_ids, hold_kv=True,
                    fork_parent=parent.request_id)
    return child


def refs(sched: Scheduler, ids: list[int]) -> list[int]:
    return [sched.kv_cache_manager.block_pool.blocks[i].ref_cnt for i in ids]


def test_beam_forks_share_the_cross_blocks_and_do_not_run_the_encoder():
    sched = scheduler()
    kv = sched.kv_cache_manager
    parent = encdec("p", 9, max_tokens=1)  # 3 cross blocks [1, 2, 3], its decoder token in block 4
    parent.hold_kv = True
    sched.add_request(parent)
    out, updates = step(sched)
    assert out.scheduled_encoder_prompts == ["p"] and updates[0].finished and "p" in sched.held
    sched.add_requests([encdec_fork("a", parent, 50), encdec_fork("b", parent, 51)])
    sched.release_held("p")
    out, updates = step(sched)
    assert out.scheduled_encoder_prompts == [] and out.scheduled_encoder_inputs == {}
    new = {d.req_id: d for d in out.scheduled_new_reqs}
    assert new["a"].cross_block_ids == new["b"].cross_block_ids == [1, 2, 3]
    assert new["a"].encoder_prompt_token_ids == parent.encoder_prompt_token_ids
    assert out.blocks_to_copy == [(4, 5), (4, 6)] and new["a"].block_ids == [5] and new["b"].block_ids == [6]
    # the parent went at the end of the step: its cross blocks live on, one reference per fork
    assert "p" not in sched.held and refs(sched, [1, 2, 3, 4]) == [2, 2, 2, 0]
    assert {u.request_id for u in updates if u.finished} == {"a", "b"}
    sched.release_held("a")
    assert refs(sched, [1, 2, 3]) == [1, 1, 1] and kv.get_cross_block_ids("b") == [1, 2, 3]
    sched.release_held("b")
    assert kv.num_free_blocks == kv.num_usable_blocks


def test_a_preempted_beam_fork_runs_its_encoder_into_cross_blocks_of_its_own():
    # 12 usable blocks: c holds 4 cross + its decoder blocks, the fork a shares p's 3 cross blocks; both decode
    # until the pool is short and a, admitted last, is preempted
    sched = scheduler()
    kv = sched.kv_cache_manager
    sched.add_request(encdec("c", 16, max_tokens=20))
    step(sched)
    parent = encdec("p", 9, max_tokens=1)
    parent.hold_kv = True
    sched.add_request(parent)
    step(sched)
    child = encdec_fork("a", parent, 50)
    child.sampling_params = Params(max_tokens=12)  # a fork that keeps decoding (a stand-in for a long beam)
    child.hold_kv = False
    sched.add_requests([child])
    sched.release_held("p")
    out, _ = step(sched)
    shared = kv.get_cross_block_ids("a")
    assert len(shared) == 3 and out.scheduled_encoder_prompts == [] and not sched.held
    preempted, resumed = [], False
    while sched.requests:
        out, _ = step(sched)
        preempted += out.preempted_request_ids
        if "a" in out.scheduled_encoder_prompts:  # back: a cross table of its own, the encoder runs again
            cached = out.scheduled_cached_reqs
            i = cached.req_ids.index("a")
            assert cached.resumed_from_preemption[i] and len(cached.new_cross_block_ids[i]) == 3
            assert out.num_scheduled_tokens["a"] == sched.requests["a"].num_computed_tokens
            resumed = True
    assert preempted == ["a"] and resumed
    assert kv.num_free_blocks == kv.num_usable_blocks

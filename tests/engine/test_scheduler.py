"""The token-budget scheduler, step by step: chunks, admission, preemption, encoder budget, stops, aborts."""
import pytest

from fovea.engine.request import RequestStatus
from fovea.engine.scheduler import Scheduler, SchedulerConfig
from tests.engine import StepView, image, make_request, runner_output

TOKEN = 7  # what the fake runner samples unless told otherwise


def scheduler(**overrides) -> Scheduler:
    kwargs = dict(num_blocks=21, block_size=4, max_num_seqs=8, max_num_batched_tokens=16, max_model_len=32)
    kwargs.update(overrides)
    return Scheduler(SchedulerConfig(**kwargs))


def schedule(sched: Scheduler) -> StepView:
    return StepView(sched, sched.schedule())


def step(sched: Scheduler, tokens: dict | None = None):
    """One engine step with a runner that samples TOKEN (or `tokens[request_id]`) for every scheduled request."""
    out = schedule(sched)
    tokens = tokens or {}
    sampled = {s.request.request_id: list(tokens.get(s.request.request_id, [TOKEN])) for s in out.scheduled}
    return out, sched.update_from_output(out.out, runner_output(sampled))


def summary(out) -> list[tuple]:
    return [(s.request.request_id, s.num_computed_tokens, s.num_new_tokens, s.is_new) for s in out.scheduled]


# ---- configuration and admission checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_blocks=1), "num_blocks"),
        (dict(block_size=0), "block_size"),
        (dict(max_num_seqs=0), "max_num_seqs"),
        (dict(max_model_len=-1), "max_model_len"),
        (dict(enable_chunked_prefill="yes"), "enable_chunked_prefill"),
        (dict(enable_chunked_prefill=False, max_num_batched_tokens=16, max_model_len=32), "max_num_batched_tokens"),
        (dict(max_tokens_per_mm_item=100, max_num_encoder_input_tokens=50), "max_num_encoder_input_tokens"),
        (dict(max_tokens_per_mm_item=100, encoder_cache_size=50), "encoder_cache_size"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        scheduler(**overrides)


def test_encoder_limits_default_to_the_token_budget_or_the_largest_item():
    cfg = scheduler().config
    assert (cfg.max_num_encoder_input_tokens, cfg.encoder_cache_size) == (16, 16)
    cfg = scheduler(max_tokens_per_mm_item=40).config
    assert (cfg.max_num_encoder_input_tokens, cfg.encoder_cache_size) == (40, 40)


@pytest.mark.parametrize(
    "request_, match",
    [
        (make_request("r", 0), "empty"),
        (make_request("r", 33), "max_model_len"),
        # 20 prompt + 20 outputs (max_model_len caps it at 32, minus the last never fed back) = 31 tokens = 8 blocks
        (make_request("r", 20, max_tokens=20), "KV blocks"),
        (make_request("r", 20, max_tokens=1, mm=[image(0, 17, "big")]), "encoder"),
        (make_request("r", 20, max_tokens=1, mm=[image(4, 4, "a"), image(2, 4, "b")]), "sorted"),
        (make_request("r", 20, max_tokens=1, mm=[image(18, 4, "a")]), "sorted"),
    ],
)
def test_requests_that_could_never_run_are_refused(request_, match):
    sched = scheduler(num_blocks=8)  # 7 usable blocks = 28 tokens
    with pytest.raises(ValueError, match=match):
        sched.add_request(request_)
    assert not sched.has_unfinished_requests()


def test_request_that_just_fits_is_accepted_and_ids_are_unique():
    sched = scheduler(num_blocks=8)
    sched.add_request(make_request("r", 20, max_tokens=9))  # at most 28 tokens in the KV
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(make_request("r", 4))


def test_add_requests_is_all_or_none():
    sched = scheduler()
    sched.add_request(make_request("1_a", 4))
    with pytest.raises(ValueError, match="already in use"):
        sched.add_requests([make_request("0_a", 4), make_request("1_a", 4)])
    with pytest.raises(ValueError, match="repeat one another"):
        sched.add_requests([make_request("x", 4), make_request("x", 4)])
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add_requests([make_request("y", 4), make_request("z", 33)])
    assert list(sched.requests) == ["1_a"] and [r.request_id for r in sched.waiting] == ["1_a"]


def test_without_chunked_prefill_all_items_of_a_prompt_must_fit_one_step():
    sched = scheduler(enable_chunked_prefill=False, max_num_batched_tokens=32, max_num_encoder_input_tokens=10)
    with pytest.raises(ValueError, match="one step"):
        sched.add_request(make_request("r", 20, mm=[image(0, 6, "a"), image(8, 6, "b")]))
    sched.add_request(make_request("s", 20, mm=[image(0, 6, "a"), image(8, 6, "a")]))  # one hash: encoded once


# ---- chunks and admission ---------------------------------------------------------------------------------------


def test_chunked_prefill_splits_prompts_under_the_token_budget():
    sched = scheduler()
    sched.add_request(make_request("r0", 20, max_tokens=3))
    sched.add_request(make_request("r1", list(range(100, 110)), max_tokens=3))
    out, updates = step(sched)
    assert summary(out) == [("r0", 0, 16, True)] and out.num_scheduled_tokens == 16
    assert out.scheduled[0].block_ids == [1, 2, 3, 4] and updates == []  # mid-prompt: nothing sampled
    out, updates = step(sched)
    assert summary(out) == [("r0", 16, 4, False), ("r1", 0, 10, True)]
    assert [s.block_ids for s in out.scheduled] == [[1, 2, 3, 4, 5], [6, 7, 8]]
    assert [(u.request_id, u.new_token_ids, u.finished) for u in updates] == [("r0", [7], False), ("r1", [7], False)]
    out, _ = step(sched)
    assert summary(out) == [("r0", 20, 1, False), ("r1", 10, 1, False)]
    out, updates = step(sched)
    assert [(u.request_id, u.finished, u.status) for u in updates] == [
        ("r0", True, RequestStatus.FINISHED_LENGTH),
        ("r1", True, RequestStatus.FINISHED_LENGTH),
    ]
    out, _ = step(sched)
    assert out.scheduled == [] and out.finished_request_ids == ["r0", "r1"]
    assert sched.kv_cache_manager.num_free_blocks == sched.kv_cache_manager.num_usable_blocks and not sched.has_unfinished_requests()


def test_without_chunked_prefill_a_prompt_waits_for_room_for_all_of_it():
    sched = scheduler(enable_chunked_prefill=False, max_num_batched_tokens=32)
    sched.add_request(make_request("r0", 30))
    sched.add_request(make_request("r1", list(range(100, 110))))
    sched.add_request(make_request("r2", list(range(200, 201))))  # fits, but may not overtake r1
    out, _ = step(sched)
    assert summary(out) == [("r0", 0, 30, True)]
    out, _ = step(sched)
    assert summary(out) == [("r0", 30, 1, False), ("r1", 0, 10, True), ("r2", 0, 1, True)]


def test_max_num_seqs_caps_the_running_set():
    sched = scheduler(max_num_seqs=2)
    sched.add_request(make_request("r0", 4, max_tokens=1))
    sched.add_request(make_request("r1", list(range(10, 14)), max_tokens=5))
    sched.add_request(make_request("r2", list(range(20, 24)), max_tokens=5))
    out, updates = step(sched)
    assert summary(out) == [("r0", 0, 4, True), ("r1", 0, 4, True)]
    assert updates[0].finished and sched.num_running == 1 and sched.num_waiting == 1
    out, _ = step(sched)
    assert summary(out) == [("r1", 4, 1, False), ("r2", 0, 4, True)] and out.finished_request_ids == ["r0"]


def test_identical_prompts_in_one_step_share_blocks():
    sched = scheduler()
    sched.add_request(make_request("r0", 10))
    sched.add_request(make_request("r1", 10))
    out, _ = step(sched)
    assert summary(out) == [("r0", 0, 10, True), ("r1", 8, 2, True)]
    assert [s.block_ids for s in out.scheduled] == [[1, 2, 3], [1, 2, 4]]
    blocks = sched.kv_cache_manager.block_pool.blocks
    assert [blocks[i].ref_cnt for i in (1, 2, 3, 4)] == [2, 2, 1, 1]
    r1 = out.scheduled[1].request
    assert r1.num_cached_prompt_tokens == 8
    kv = sched.kv_cache_manager
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (20, 8)


# ---- preemption -------------------------------------------------------------------------------------------------


def test_preemption_takes_the_newest_and_it_resumes_by_recomputing():
    sched = scheduler(num_blocks=8, max_num_batched_tokens=32)  # 7 usable blocks
    for i in range(3):
        sched.add_request(make_request(f"r{i}", list(range(100 * i, 100 * i + 8)), max_tokens=3))
    out, _ = step(sched)
    assert [s.block_ids for s in out.scheduled] == [[1, 2], [3, 4], [5, 6]]
    # position 8 needs a third block each: r0 takes the last free one, r1 preempts r2 and takes its tail block
    out, _ = step(sched)
    assert summary(out) == [("r0", 8, 1, False), ("r1", 8, 1, False)]
    assert [s.block_ids for s in out.scheduled] == [[1, 2, 7], [3, 4, 6]]
    assert out.preempted_request_ids == ["r2"]
    r2 = sched.requests["r2"]
    assert (r2.status, r2.num_computed_tokens, r2.num_preemptions) == (RequestStatus.PREEMPTED, 0, 1)
    assert list(sched.waiting) == [r2] and sched.num_preemptions == 1
    assert list(sched.kv_cache_manager.block_pool.free_queue) == [5]  # r2's first block, still cached
    # its cached first block alone cannot make room for all 9 tokens: r2 waits until r0 and r1 finish
    out, updates = step(sched)
    assert summary(out) == [("r0", 9, 1, False), ("r1", 9, 1, False)] and all(u.finished for u in updates)
    assert list(sched.kv_cache_manager.block_pool.free_queue) == [5, 7, 2, 1, 6, 4, 3]
    out, _ = step(sched)
    # prompt + its one output are recomputed, the first block from the prefix cache
    assert summary(out) == [("r2", 4, 5, True)] and out.scheduled[0].block_ids == [5, 7, 2]
    assert r2.status == RequestStatus.RUNNING and r2.num_cached_prompt_tokens == 0
    step(sched)
    assert r2.is_finished and r2.output_token_ids == [TOKEN] * 3


def test_a_request_that_must_preempt_itself_stops_the_running_pass():
    sched = scheduler(num_blocks=5)  # 4 usable blocks
    sched.add_request(make_request("r0", 6, max_tokens=2))
    sched.add_request(make_request("r1", list(range(10, 18)), max_tokens=2))
    sched.add_request(make_request("r2", [99], max_tokens=2))
    out, _ = step(sched)
    assert summary(out) == [("r0", 0, 6, True), ("r1", 0, 8, True)]  # no block left for r2
    out, _ = step(sched)
    # r0's next token fits its block; r1 (the tail) needs a block and preempts itself; nobody is admitted
    assert summary(out) == [("r0", 6, 1, False)] and out.preempted_request_ids == ["r1"]
    assert [r.request_id for r in sched.waiting] == ["r1", "r2"]


# ---- encoder scheduling -----------------------------------------------------------------------------------------


def test_item_spanning_chunks_is_encoded_once_and_freed_when_computed():
    sched = scheduler(max_num_batched_tokens=8, max_num_encoder_input_tokens=16, encoder_cache_size=16)
    sched.add_request(make_request("r", 20, mm=[image(2, 12, "img")], max_tokens=1))
    out, _ = step(sched)
    assert summary(out) == [("r", 0, 8, True)] and out.scheduled[0].encoder_inputs == [0]
    assert sched.encoder_cache_manager.num_free_slots == 4
    out, _ = step(sched)
    assert summary(out) == [("r", 8, 8, False)] and out.scheduled[0].encoder_inputs == []
    assert out.freed_mm_hashes == []
    out, _ = step(sched)  # placeholders [2, 14) were computed last step: the runner may drop the output now
    assert summary(out) == [("r", 16, 4, False)] and out.freed_mm_hashes == ["img"]
    assert sched.encoder_cache_manager.num_free_slots == 16


def test_chunk_stops_before_an_item_over_the_encoder_budget():
    sched = scheduler(max_num_batched_tokens=32, max_num_encoder_input_tokens=8)
    sched.add_request(make_request("r", 20, mm=[image(2, 6, "a"), image(10, 6, "b")]))
    out, _ = step(sched)
    assert summary(out) == [("r", 0, 10, True)] and out.scheduled[0].encoder_inputs == [0]
    out, _ = step(sched)
    assert summary(out) == [("r", 10, 10, False)] and out.scheduled[0].encoder_inputs == [1]
    assert out.freed_mm_hashes == ["a"]


def test_request_waits_when_its_next_item_does_not_fit_at_all():
    sched = scheduler(max_num_batched_tokens=32, max_num_encoder_input_tokens=8, encoder_cache_size=8)
    sched.add_request(make_request("r0", 8, mm=[image(0, 6, "a")]))
    sched.add_request(make_request("r1", list(range(10, 18)), mm=[image(0, 6, "b")]))
    out, _ = step(sched)
    assert summary(out) == [("r0", 0, 8, True)]  # 2 encoder tokens left: r1's item would be cut at 0
    assert sched.encoder_cache_manager.num_free_slots == sched.config.encoder_cache_size  # r1 holds none waiting
    out, _ = step(sched)
    assert summary(out) == [("r0", 8, 1, False), ("r1", 0, 8, True)] and out.scheduled[1].encoder_inputs == [0]
    assert out.freed_mm_hashes == ["a"]


def test_shared_image_is_encoded_once_for_two_requests():
    sched = scheduler(max_num_batched_tokens=32)
    sched.add_request(make_request("r0", [1] + [5] * 6 + [1, 2], mm=[image(1, 6, "same")]))
    sched.add_request(make_request("r1", [2] + [5] * 6 + [3], mm=[image(1, 6, "same")]))
    out, _ = step(sched)
    assert [s.encoder_inputs for s in out.scheduled] == [[0], []]
    out, _ = step(sched)
    assert out.freed_mm_hashes == ["same"]


def test_one_image_twice_in_a_chunk_is_encoded_and_charged_once():
    sched = scheduler(max_num_batched_tokens=32, max_num_encoder_input_tokens=8, encoder_cache_size=8)
    sched.add_request(make_request("r", 20, mm=[image(2, 6, "same"), image(10, 6, "same")], max_tokens=2))
    out = schedule(sched)
    assert summary(out) == [("r", 0, 20, True)] and out.scheduled[0].encoder_inputs == [0]
    assert sched.encoder_cache_manager.num_free_slots == 2
    assert sched.encoder_cache_manager.get_cached_input_ids(out.scheduled[0].request) == {0, 1}
    sched.update_from_output(out.out, runner_output({"r": [TOKEN]}))
    out, _ = step(sched)
    assert out.freed_mm_hashes == ["same"]


def test_prefix_hit_ending_inside_an_image_encodes_it_again():
    sched = scheduler(max_num_batched_tokens=32)
    tokens = list(range(16))
    sched.add_request(make_request("r0", tokens, mm=[image(6, 8, "img")], max_tokens=1))
    step(sched)
    out, _ = step(sched)
    assert out.freed_mm_hashes == ["img"] and out.finished_request_ids == ["r0"]
    sched.add_request(make_request("r1", tokens, mm=[image(6, 8, "img")], max_tokens=1))
    out, _ = step(sched)
    assert summary(out) == [("r1", 12, 4, True)] and out.scheduled[0].encoder_inputs == [0]


# ---- stops ------------------------------------------------------------------------------------------------------


def run_one(sched: Scheduler, request, script: list[list[int]]):
    """Drive one request with scripted samples per step; return its updates."""
    sched.add_request(request)
    updates = []
    for tokens in script:
        _, new = step(sched, {request.request_id: tokens})
        updates += new
        if request.is_finished:
            break
    return updates


@pytest.mark.parametrize(
    "params, script, output, status, reason",
    [
        (dict(max_tokens=3), [[4]] * 5, [4, 4, 4], RequestStatus.FINISHED_LENGTH, None),
        (dict(max_tokens=9), [[4], [2], [4]], [4, 2], RequestStatus.FINISHED_STOPPED, None),  # 2 is EOS
        (dict(max_tokens=3, ignore_eos=True), [[2]] * 5, [2, 2, 2], RequestStatus.FINISHED_LENGTH, None),
        (dict(max_tokens=9, min_tokens=3), [[2]] * 5, [2, 2, 2], RequestStatus.FINISHED_STOPPED, None),
        (dict(max_tokens=9, stop_token_ids=[8]), [[4], [8]], [4, 8], RequestStatus.FINISHED_STOPPED, 8),
        (dict(max_tokens=9, min_tokens=2, stop_token_ids=[8]), [[8]] * 3, [8, 8], RequestStatus.FINISHED_STOPPED, 8),
        (dict(max_tokens=None), [[4]] * 20, [4] * 12, RequestStatus.FINISHED_LENGTH, None),  # 20 + 12 = max_model_len
        (dict(max_tokens=2), [[2]] * 3, [2], RequestStatus.FINISHED_STOPPED, None),
        (dict(max_tokens=1), [[2]], [2], RequestStatus.FINISHED_LENGTH, None),  # max_tokens is checked first
        (dict(max_tokens=9), [[4, 4, 2, 4]], [4, 4, 2], RequestStatus.FINISHED_STOPPED, None),  # several per step
    ],
)
def test_stop_conditions(params, script, output, status, reason):
    sched = scheduler(max_num_batched_tokens=32)
    request = make_request("r", 20, eos=2, **params)
    updates = run_one(sched, request, script)
    assert request.output_token_ids == output
    assert [t for u in updates for t in u.new_token_ids] == output
    last = updates[-1]
    assert (last.finished, last.status, last.stop_reason) == (True, status, reason)
    assert sum(u.finished for u in updates) == 1
    assert sched.kv_cache_manager.num_free_blocks == sched.kv_cache_manager.num_usable_blocks and not sched.has_unfinished_requests()


# ---- aborts -----------------------------------------------------------------------------------------------------


def test_abort_frees_blocks_and_encoder_entries_of_running_and_waiting_requests():
    sched = scheduler(max_num_seqs=1, max_num_batched_tokens=8, max_num_encoder_input_tokens=16, encoder_cache_size=16)
    sched.add_request(make_request("r0", 20, mm=[image(2, 12, "img")]))
    sched.add_request(make_request("r1", 4))
    out = schedule(sched)
    assert summary(out) == [("r0", 0, 8, True)]
    # aborted between schedule() and update_from_output(): the update skips it
    sched.finish_requests(["r0", "r1", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert sched.update_from_output(out.out, runner_output({"r0": [7]})) == []
    assert sched.kv_cache_manager.num_free_blocks == 20 and sched.encoder_cache_manager.num_free_slots == 16
    assert not sched.has_unfinished_requests() and sched.num_waiting == sched.num_running == 0
    out = sched.schedule()
    assert out.finished_request_ids == ["r0", "r1"] and out.freed_mm_hashes == ["img"]
    with pytest.raises(ValueError, match="finished status"):
        sched.finish_requests("r0", RequestStatus.RUNNING)


def test_missing_sample_for_a_request_at_its_last_token_is_an_error():
    sched = scheduler()
    sched.add_request(make_request("r", 4))
    out = sched.schedule()
    with pytest.raises(ValueError, match="no sampled token"):
        sched.update_from_output(out, runner_output({}))


# ---- many steps, random load, invariants every step ---------------------------------------------------------------


class FakeRunner:
    """Stands in for the model runner and, like it, keeps its own per-request state from the messages alone:
    token ids from `NewRequestData` plus the tokens it samples, block tables grown from the new block ids (or
    replaced on resumption), encoder outputs by hash. Every step it checks that state against the scheduler's
    live requests, then writes a KV store of (token id, image hash) per slot for all scheduled tokens and checks
    that every request's whole context reads back its own tokens, so a wrongly shared or reused block shows up
    as wrong content."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.kv: dict[int, tuple] = {}
        self.state: dict[str, dict] = {}
        self.encoder_outputs: set[str] = set()

    @staticmethod
    def content(state: dict, pos: int) -> tuple:
        for f in state["mm"]:
            if f.offset <= pos < f.offset + f.length:
                return state["tokens"][pos], f.mm_hash
        return state["tokens"][pos], None

    def slot(self, block_ids: list[int], pos: int) -> int:
        return block_ids[pos // self.block_size] * self.block_size + pos % self.block_size

    def execute(self, sched, out):
        for rid in out.finished_request_ids:
            self.state.pop(rid, None)
        for mm_hash in out.freed_mm_hashes:
            self.encoder_outputs.remove(mm_hash)
        for new in out.scheduled_new_reqs:
            assert new.req_id not in self.state
            self.state[new.req_id] = dict(tokens=list(new.prompt_token_ids), blocks=list(new.block_ids),
                                          computed=new.num_computed_tokens, mm=new.mm_features)
        cached = out.scheduled_cached_reqs
        for rid, resumed, blocks, computed in zip(cached.req_ids, cached.resumed_from_preemption,
                                                  cached.new_block_ids, cached.num_computed_tokens):
            state = self.state[rid]
            state["blocks"] = list(blocks) if resumed else state["blocks"] + blocks
            assert resumed or computed == state["computed"]
            state["computed"] = computed
        for rid, indices in out.scheduled_encoder_inputs.items():
            self.encoder_outputs.update(self.state[rid]["mm"][i].mm_hash for i in indices)
        for rid, n in out.num_scheduled_tokens.items():
            state = self.state[rid]
            assert state["tokens"] == sched.requests[rid].all_token_ids
            assert state["blocks"] == sched.kv_cache_manager.get_block_ids(rid) and 0 not in state["blocks"]
            for pos in range(state["computed"], state["computed"] + n):
                self.kv[self.slot(state["blocks"], pos)] = self.content(state, pos)
        sampled = {}
        for rid, n in out.num_scheduled_tokens.items():
            state = self.state[rid]
            start, end = state["computed"], state["computed"] + n
            for pos in range(end):
                assert self.kv[self.slot(state["blocks"], pos)] == self.content(state, pos)
            for f in state["mm"]:
                if f.offset < end and f.offset + f.length > start:
                    assert f.mm_hash in self.encoder_outputs
            state["computed"] = end
            if end == len(state["tokens"]):
                state["tokens"].append(token_for(rid))
                sampled[rid] = [token_for(rid)]
        return runner_output(sampled)


def token_for(request_id: str) -> int:
    return 500 + int(request_id[1:])


def check_invariants(sched: Scheduler) -> None:
    cfg, kv = sched.config, sched.kv_cache_manager
    pool = kv.block_pool
    assert set(kv.req_to_blocks) == {r.request_id for r in sched.running}
    assert len(sched.running) <= cfg.max_num_seqs
    uses: dict[int, int] = {}
    for request in sched.running:
        assert request.status == RequestStatus.RUNNING
        blocks = kv.req_to_blocks[request.request_id]
        ids = [b.block_id for b in blocks]
        assert len(set(ids)) == len(ids) and 0 not in ids
        assert len(blocks) == -(-request.num_computed_tokens // cfg.block_size)
        for i, block in enumerate(blocks):
            uses[block.block_id] = uses.get(block.block_id, 0) + 1
            if block.block_hash is not None:  # a cached block holds exactly what this request would put there
                assert block.block_hash == request.block_hashes[i]
    for block in pool.blocks[1:]:
        assert block.ref_cnt == uses.get(block.block_id, 0)
        assert (block.block_id in pool.free_queue) == (block.ref_cnt == 0)
        if block.ref_cnt > 1:
            assert block.block_hash is not None  # blocks are only shared through the prefix cache
    assert pool.null_block.ref_cnt == 1 and 0 not in pool.free_queue
    assert kv.num_free_blocks + len(uses) == kv.num_usable_blocks
    assert all(pool.cached_blocks[b.block_hash] is b for b in pool.blocks if b.block_hash is not None)
    assert len(pool.cached_blocks) == sum(b.block_hash is not None for b in pool.blocks)
    for request in sched.waiting:
        assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert request.num_computed_tokens == 0
    assert len(sched.requests) == len(sched.running) + len(sched.waiting)
    enc = sched.encoder_cache_manager
    assert enc.num_free_slots + sum(enc._num_tokens.values()) == cfg.encoder_cache_size
    assert set(enc._req_items) <= {r.request_id for r in sched.running}


IMAGE_SIZES = {"A": 4, "B": 6, "C": 8}


def random_request(rng, index: int, chunked: bool):
    bases = [list(range(1, 40)), list(range(40, 80)), [3] * 40]
    tokens = bases[rng.randrange(3)][: rng.randint(1, 26)] + [rng.randrange(100, 200) for _ in range(rng.randint(0, 4))]
    mm, pos, budget = [], rng.randint(0, 4), 12
    for mm_hash in rng.choices(sorted(IMAGE_SIZES), k=rng.choice([0, 0, 1, 2, 3])):  # repeats allowed
        size = IMAGE_SIZES[mm_hash]
        is_repeat = any(f.mm_hash == mm_hash for f in mm)
        if pos + size > len(tokens) or (not chunked and not is_repeat and size > budget):
            break
        tokens[pos : pos + size] = [999] * size  # the image token: only the hash tells images apart
        mm.append(image(pos, size, mm_hash))
        budget -= 0 if is_repeat else size
        pos += size + rng.randint(0, 3)
    rid = f"r{index}"
    eos = token_for(rid) if rng.random() < 0.3 else None
    return make_request(rid, tokens, mm=mm, eos=eos, max_tokens=rng.randint(1, 12), min_tokens=rng.randint(0, 2))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("chunked, prefix", [(True, True), (True, False), (False, True), (False, False)])
def test_random_load_keeps_every_invariant(chunked, prefix, seed):
    import random

    rng = random.Random(seed)
    sched = scheduler(
        num_blocks=13, max_num_seqs=6, max_num_batched_tokens=16 if chunked else 40, max_model_len=40,
        enable_chunked_prefill=chunked, enable_prefix_caching=prefix,
        max_num_encoder_input_tokens=12, encoder_cache_size=16,
    )
    runner = FakeRunner(block_size=4)
    added, finished, aborted = {}, set(), set()
    num_requests = 40
    for _ in range(2000):
        if len(added) < num_requests:
            for _ in range(min(rng.choice([0, 0, 1, 3]), num_requests - len(added))):
                request = random_request(rng, len(added), chunked)
                sched.add_request(request)
                added[request.request_id] = request
        if sched.requests and rng.random() < 0.03:  # abort before the step
            rid = rng.choice(sorted(sched.requests))
            sched.finish_requests(rid, RequestStatus.FINISHED_ABORTED)
            aborted.add(rid)
        out = schedule(sched)
        check_invariants(sched)
        assert out.num_scheduled_tokens == sum(s.num_new_tokens for s in out.scheduled) <= 40
        encoded = sum(s.request.mm_features[i].num_encoder_tokens for s in out.scheduled for i in s.encoder_inputs)
        assert encoded <= 12
        sampled = runner.execute(sched, out.out)
        if sched.requests and rng.random() < 0.03:  # abort between schedule() and update_from_output()
            rid = rng.choice(sorted(sched.requests))
            sched.finish_requests([rid], RequestStatus.FINISHED_ABORTED)
            aborted.add(rid)
        for update in sched.update_from_output(out.out, sampled):
            assert update.request_id not in finished and update.request_id not in aborted
            if update.finished:
                finished.add(update.request_id)
        check_invariants(sched)
        if len(added) == num_requests and not sched.has_unfinished_requests():
            break
    assert not sched.has_unfinished_requests() and len(added) == num_requests
    assert finished | aborted == set(added) and not finished & aborted  # none lost, none finished twice
    for rid, request in added.items():
        assert request.is_finished
        assert set(request.output_token_ids) <= {token_for(rid)}
        if rid in finished:
            assert 1 <= request.num_output_tokens <= request.sampling_params.max_tokens
    assert sched.kv_cache_manager.num_free_blocks == sched.kv_cache_manager.num_usable_blocks
    assert sched.encoder_cache_manager.num_free_slots == sched.config.encoder_cache_size
    assert sched.num_preemptions > 0
    if prefix:
        assert sched.kv_cache_manager.prefix_cache_hits > 0

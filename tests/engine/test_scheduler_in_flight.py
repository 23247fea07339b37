"""The scheduler with pipeline micro-batches (scheduler_in_flight.py): requests in flight are skipped, never
preempted, and finished from outside only when their batch lands; the per-step cap splits the running requests.
Pure Python, exact block ids, no runner (batches are landed in whatever order a test says)."""
import random

from fovea.engine.request import RequestStatus
from fovea.engine.scheduler import Scheduler, SchedulerConfig
from tests.engine import StepView, make_request, runner_output

TOKEN = 7


def scheduler(**overrides) -> Scheduler:
    kwargs = dict(num_blocks=21, block_size=4, max_num_seqs=8, max_num_batched_tokens=16, max_model_len=32)
    kwargs.update(overrides)
    sched = Scheduler(SchedulerConfig(**kwargs))
    sched.track_in_flight = True
    return sched


def dispatch(sched: Scheduler, cap: int | None = None) -> StepView:
    return StepView(sched, sched.schedule(cap))


def land(sched: Scheduler, view: StepView, tokens: dict | None = None):
    """The reply of `view`'s batch: TOKEN for every request whose chunk reached its last token."""
    tokens = tokens or {}
    sampled = {s.request.request_id: list(tokens.get(s.request.request_id, [TOKEN])) for s in view.scheduled
               if s.num_computed_tokens + s.num_new_tokens == s.request.num_tokens}
    return sched.update_from_output(view.out, runner_output(sampled))


def ids(view: StepView) -> list[str]:
    return [s.request.request_id for s in view.scheduled]


def test_a_request_in_flight_is_not_scheduled_again_until_its_batch_lands():
    sched = scheduler()
    for i in range(4):
        sched.add_request(make_request(f"r{i}", list(range(10 * i, 10 * i + 3)), max_tokens=3))
    a = dispatch(sched, cap=2)
    assert ids(a) == ["r0", "r1"] and sched.in_flight == {"r0", "r1"}
    b = dispatch(sched, cap=2)
    assert ids(b) == ["r2", "r3"] and sched.in_flight == {"r0", "r1", "r2", "r3"}
    assert dispatch(sched).num_scheduled_tokens == 0  # everything is in flight
    updates = land(sched, a)
    assert [(u.request_id, u.new_token_ids) for u in updates] == [("r0", [TOKEN]), ("r1", [TOKEN])]
    assert sched.in_flight == {"r2", "r3"}
    a2 = dispatch(sched)
    assert ids(a2) == ["r0", "r1"] and [s.num_computed_tokens for s in a2.scheduled] == [3, 3]
    land(sched, b)
    land(sched, a2)
    assert sched.in_flight == set()


def test_a_prompt_chunk_in_flight_holds_its_next_chunk_back():
    sched = scheduler(max_num_batched_tokens=8)
    sched.add_request(make_request("long", 20, max_tokens=2))
    sched.add_request(make_request("short", [50, 51], max_tokens=2))
    a = dispatch(sched)
    assert [(s.request.request_id, s.num_new_tokens) for s in a.scheduled] == [("long", 8)]
    b = dispatch(sched)  # long's second chunk waits for the first; short is admitted meanwhile
    assert [(s.request.request_id, s.num_new_tokens) for s in b.scheduled] == [("short", 2)]
    assert land(sched, a) == []  # mid-prompt: nothing sampled
    c = dispatch(sched)
    assert [(s.request.request_id, s.num_computed_tokens, s.num_new_tokens) for s in c.scheduled] == [("long", 8, 8)]


def test_preemption_never_evicts_a_request_in_flight():
    sched = scheduler(num_blocks=5, max_num_batched_tokens=32)  # 4 usable blocks
    sched.add_request(make_request("r0", 8, max_tokens=3))
    sched.add_request(make_request("r1", list(range(10, 18)), max_tokens=3))
    a = dispatch(sched, cap=1)
    b = dispatch(sched, cap=1)
    assert [(ids(v), v.scheduled[0].block_ids) for v in (a, b)] == [(["r0"], [1, 2]), (["r1"], [3, 4])]
    land(sched, a)
    # r0's 9th token needs a third block and none is free. One batch at a time r1 (the newest) would be
    # evicted; it is in flight, so r0 preempts itself and r1's blocks stay its own
    c = dispatch(sched)
    assert c.num_scheduled_tokens == 0 and c.out.preempted_request_ids == ["r0"]
    assert sched.requests["r0"].status == RequestStatus.PREEMPTED
    assert sched.kv_cache_manager.get_block_ids("r1") == [3, 4] and sched.requests["r1"].status == RequestStatus.RUNNING
    land(sched, c)
    land(sched, b)
    d = dispatch(sched)  # r1 grows into r0's freed blocks (its block 2 comes first in the free queue)
    assert ids(d) == ["r1"] and d.scheduled[0].block_ids == [3, 4, 2]


def test_an_abort_in_flight_is_applied_when_the_batch_lands_and_emits_nothing():
    sched = scheduler()
    sched.add_request(make_request("r0", 3, max_tokens=5))
    sched.add_request(make_request("r1", [40, 41, 42], max_tokens=5))
    a = dispatch(sched)
    land(sched, a)
    a = dispatch(sched)
    blocks = sched.kv_cache_manager.get_block_ids("r0")
    num_free = sched.kv_cache_manager.block_pool.num_free_blocks
    sched.finish_requests("r0", RequestStatus.FINISHED_ABORTED)
    sched.finish_requests("r0", RequestStatus.FINISHED_STOPPED)  # a second finish does not replace the first
    # still in flight: its blocks stay its own, nothing else sees it finished yet
    assert sched.kv_cache_manager.get_block_ids("r0") == blocks
    assert sched.kv_cache_manager.block_pool.num_free_blocks == num_free
    assert sched.finish_on_return == {"r0": RequestStatus.FINISHED_ABORTED}
    request = sched.requests["r0"]
    updates = land(sched, a)
    assert [u.request_id for u in updates] == ["r1"]  # r0's sampled token is not emitted
    assert request.status == RequestStatus.FINISHED_ABORTED and request.output_token_ids == [TOKEN]
    assert "r0" not in sched.requests and sched.finish_on_return == {}
    assert sched.kv_cache_manager.block_pool.num_free_blocks == num_free + len(blocks)
    assert dispatch(sched).out.finished_request_ids == ["r0"]  # the runners drop it with the next batch


def test_an_abort_of_a_request_not_in_flight_is_immediate():
    sched = scheduler()
    sched.add_request(make_request("r0", 3, max_tokens=5))
    sched.add_request(make_request("r1", [40, 41, 42], max_tokens=5))
    a = dispatch(sched, cap=1)
    sched.finish_requests("r1", RequestStatus.FINISHED_ABORTED)  # waiting, not in flight
    assert "r1" not in sched.requests and ids(a) == ["r0"]


def test_one_batch_at_a_time_tracks_nothing():
    sched = Scheduler(SchedulerConfig(num_blocks=21, block_size=4, max_num_seqs=8, max_num_batched_tokens=16))
    sched.add_request(make_request("r0", 3, max_tokens=5))
    view = dispatch(sched)
    assert sched.in_flight == set()
    sched.finish_requests("r0", RequestStatus.FINISHED_ABORTED)  # between schedule and update: immediate
    assert "r0" not in sched.requests and land(sched, view) == []


def test_random_micro_batches_keep_every_invariant_and_free_every_block():
    """Up to 3 batches in flight, landed oldest first, with aborts at random moments: a request is in at most one
    batch in flight, nothing is emitted after a finish, every request finishes, every block comes back."""
    rng = random.Random(0)
    sched = scheduler(num_blocks=9, max_num_batched_tokens=12, max_num_seqs=6)
    usable = sched.kv_cache_manager.num_usable_blocks
    queue, finished, aborted, added = [], set(), set(), 0
    for _ in range(400):
        if added < 40 and rng.random() < 0.5:
            sched.add_request(make_request(f"q{added}", rng.randint(1, 14), max_tokens=rng.randint(1, 6)))
            added += 1
        if sched.requests and rng.random() < 0.05:
            rid = rng.choice(sorted(sched.requests))
            sched.finish_requests(rid, RequestStatus.FINISHED_ABORTED)
            aborted.add(rid)
        if len(queue) < 3:
            free = 3 - len(queue)
            view = dispatch(sched, cap=max(1, -(-sched.schedulable()[0] // free)))
            batch = set(ids(view))
            for other in queue:
                assert batch.isdisjoint(ids(other))
            queue.append(view)
            assert all(sched.requests[r].status == RequestStatus.RUNNING for r in sched.in_flight)
        if len(queue) == 3 or (queue and rng.random() < 0.5):
            for update in land(sched, queue.pop(0)):
                assert update.request_id not in finished and update.request_id not in aborted
                if update.finished:
                    finished.add(update.request_id)
    for _ in range(1000):
        if not (queue or sched.requests):
            break
        if queue:
            land(sched, queue.pop(0))
        if sched.requests:
            queue.append(dispatch(sched))
    assert added == 40 and len(finished | aborted) == 40 and sched.num_preemptions > 0
    assert sched.in_flight == set() and sched.finish_on_return == {}
    assert sched.kv_cache_manager.block_pool.num_free_blocks == usable

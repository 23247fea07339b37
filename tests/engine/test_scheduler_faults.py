"""A step whose model run raised (`Scheduler.fail_step`), step by step: a lone sequence fails at once; a batch is
preempted and retried one suspect at a time until the culprit fails alone; the failed step's blocks lose their
prefix-cache hashes; nothing is left behind."""
from fovea.engine.request import RequestStatus
from fovea.engine.scheduler import Scheduler, SchedulerConfig
from tests.engine import image, make_request
from tests.engine.test_scheduler import TOKEN, schedule, step, summary


def scheduler(**overrides) -> Scheduler:
    kwargs = dict(num_blocks=21, block_size=4, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=32)
    kwargs.update(overrides)
    return Scheduler(SchedulerConfig(**kwargs))


def fail(sched: Scheduler, error: Exception = RuntimeError("boom")):
    """One step whose runner raised."""
    out = schedule(sched)
    return out, sched.fail_step(out.out, error)


def assert_empty(sched: Scheduler) -> None:
    kv, encoder = sched.kv_cache_manager, sched.encoder_cache_manager
    assert not sched.requests and not sched.running and not sched.waiting and not sched.suspects
    assert kv.num_free_blocks == kv.num_usable_blocks and not kv.req_to_blocks
    assert encoder.num_free_slots == encoder.cache_size


def test_a_lone_sequence_that_fails_finishes_with_the_error_and_frees_everything():
    sched = scheduler()
    sched.add_request(make_request("a", 6, mm=[image(1, 3, "img")], max_tokens=4))
    step(sched)
    out, updates = fail(sched, ValueError("bad pixels"))
    assert summary(out) == [("a", 6, 1, False)]
    [update] = updates
    assert (update.request_id, update.finished, update.status) == ("a", True, RequestStatus.FINISHED_ERROR)
    assert update.error == update.stop_reason == "ValueError: bad pixels" and update.new_token_ids == []
    assert_empty(sched)
    assert sched.schedule().finished_request_ids == ["a"]  # the runner drops its state
    assert sched.num_failed_steps == 1


def test_a_failed_batch_is_retried_one_suspect_at_a_time_then_batched_again():
    sched = scheduler()
    for rid, n in (("a", 6), ("b", 10), ("c", 5)):
        sched.add_request(make_request(rid, n, max_tokens=8))
    step(sched)  # prefill: a, b, c computed 6, 10, 5 tokens and sampled one each
    out, updates = fail(sched)  # the decode step of all three
    assert summary(out) == [("a", 6, 1, False), ("b", 10, 1, False), ("c", 5, 1, False)]
    assert updates == []
    assert sched.suspects == {"a": 7, "b": 11, "c": 6}  # each must compute, alone, what the batch failed to
    assert not sched.running and [r.request_id for r in sched.waiting] == ["a", "b", "c"]
    assert sched.kv_cache_manager.num_free_blocks == sched.kv_cache_manager.num_usable_blocks

    # c alone (the last first): its full prompt block is a prefix hit; the failed step's block is recomputed
    out, updates = step(sched)
    assert summary(out) == [("c", 4, 2, True)]
    assert [(u.request_id, u.new_token_ids) for u in updates] == [("c", [TOKEN])]
    assert sched.suspects == {"a": 7, "b": 11} and not sched.running  # cleared, and stepped aside
    out, _ = step(sched)
    assert summary(out) == [("b", 8, 3, True)]
    out, _ = step(sched)
    assert summary(out) == [("a", 4, 3, True)]
    assert not sched.suspects and [r.request_id for r in sched.running] == ["a"]  # the last one keeps running
    assert [r.request_id for r in sched.waiting] == ["b", "c"]  # admission order kept
    out, _ = step(sched)  # batched again: a decodes, b and c come back (prefix hits up to their last token)
    assert summary(out) == [("a", 7, 1, False), ("b", 8, 4, True), ("c", 4, 3, True)]
    while sched.has_unfinished_requests():
        step(sched)
    assert_empty(sched)


def test_the_culprit_fails_alone_and_the_others_finish():
    sched = scheduler()
    for i, rid in enumerate("abc"):
        sched.add_request(make_request(rid, [10 * i + t for t in range(5)], max_tokens=3))
    fail(sched)  # the prefill of all three
    assert sched.suspects == {"a": 5, "b": 5, "c": 5}
    out, _ = step(sched)
    assert summary(out) == [("c", 0, 5, True)]  # nothing cached: the failed step's blocks lost their hashes
    out, updates = fail(sched)  # b raises alone: b is the culprit
    assert summary(out) == [("b", 0, 5, True)]
    assert [(u.request_id, u.status) for u in updates] == [("b", RequestStatus.FINISHED_ERROR)]
    out, _ = step(sched)
    assert summary(out) == [("a", 0, 5, True)]
    finished = []
    while sched.has_unfinished_requests():
        finished += [u.request_id for u in step(sched)[1] if u.finished]
    assert sorted(finished) == ["a", "c"]
    assert_empty(sched)


def test_the_failed_steps_blocks_lose_their_hashes_and_earlier_ones_keep_them():
    sched = scheduler(max_num_batched_tokens=8)
    sched.add_request(make_request("a", 12, max_tokens=4))
    sched.add_request(make_request("b", [100 + t for t in range(8)], max_tokens=4))
    out, _ = step(sched)
    assert summary(out) == [("a", 0, 8, True)]
    kv = sched.kv_cache_manager
    good = [kv.req_to_blocks["a"][i].block_hash for i in range(2)]
    out, _ = fail(sched)  # a's last prompt block [8, 12) and b's first [0, 4) were registered, never written
    assert summary(out) == [("a", 8, 4, False), ("b", 0, 4, True)]
    assert list(kv.block_pool.cached_blocks) == good
    assert kv.get_computed_blocks(sched.requests["a"])[1] == 8
    assert kv.get_computed_blocks(sched.requests["b"])[1] == 0


def test_a_suspect_aborted_while_isolating_is_no_longer_waited_for():
    sched = scheduler()
    for i, rid in enumerate("ab"):
        sched.add_request(make_request(rid, [10 * i + t for t in range(5)], max_tokens=3))
    fail(sched)
    sched.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert sched.suspects == {"b": 5}
    out, _ = step(sched)
    assert summary(out) == [("b", 0, 5, True)]
    assert not sched.suspects
    while sched.has_unfinished_requests():
        step(sched)
    assert_empty(sched)

"""Beam forks in the scheduler and KV cache, to the block: a finished hold_kv sequence keeps its blocks, a fork
shares its full blocks and gets a copy of the partial one, and a released parent is freed only after the step
that copied from it (block_size 4, blocks 1..20 usable)."""
import pytest

from fovea.engine.request import RequestStatus
from tests.engine import make_request
from tests.engine.test_scheduler import scheduler, step


def refs(sched, ids):
    return [sched.kv_cache_manager.block_pool.blocks[i].ref_cnt for i in ids]


def held_parent(sched, prompt=6):
    parent = make_request("p", prompt, max_tokens=1)
    parent.hold_kv = True
    sched.add_request(parent)
    _, updates = step(sched)
    assert updates[0].finished and "p" in sched.held and not sched.requests
    return parent


def fork(request_id, parent, token):
    child = make_request(request_id, [*parent.prompt_token_ids, token], max_tokens=1)
    child.hold_kv, child.fork_parent = True, parent.request_id
    return child


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    sched = scheduler()
    parent = held_parent(sched)  # 6 tokens: block 1 full, block 2 holds 2
    assert sched.kv_cache_manager.get_block_ids("p") == [1, 2] and refs(sched, [1, 2]) == [1, 1]
    sched.add_requests([fork("a", parent, 50), fork("b", parent, 51)])
    sched.release_held("p")  # forks pending: not freed yet
    assert "p" in sched.held and refs(sched, [1, 2]) == [1, 1]
    out, updates = step(sched)
    assert out.blocks_to_copy == [(2, 3), (2, 4)]
    assert [(s.request.request_id, s.num_computed_tokens, s.num_new_tokens, s.block_ids) for s in out.scheduled] == [
        ("a", 6, 1, [1, 3]), ("b", 6, 1, [1, 4])]
    # the parent went at the end of that schedule(): block 1 shared by the two forks (both held now), 2 free
    assert "p" not in sched.held and refs(sched, [1, 2, 3, 4]) == [2, 0, 1, 1]
    assert {u.request_id for u in updates if u.finished} == {"a", "b"}
    sched.release_held(["a", "b"])
    assert sched.kv_cache_manager.num_free_blocks == sched.kv_cache_manager.num_usable_blocks


def test_fork_at_a_block_boundary_copies_nothing():
    sched = scheduler()
    parent = held_parent(sched, prompt=8)  # blocks 1, 2 full
    sched.add_requests([fork("a", parent, 50)])
    sched.release_held("p")
    out, _ = step(sched)
    assert out.blocks_to_copy == [] and out.scheduled[0].block_ids == [1, 2, 3]
    assert refs(sched, [1, 2, 3]) == [1, 1, 1]


def test_fork_needs_a_held_parent_and_an_aborted_fork_frees_it():
    sched = scheduler()
    with pytest.raises(ValueError, match="holds no KV blocks"):
        sched.add_request(fork("x", make_request("nobody", 6), 1))
    parent = held_parent(sched)
    sched.add_requests([fork("a", parent, 50)])
    sched.release_held("p")
    sched.finish_requests("a", RequestStatus.FINISHED_ABORTED)  # never admitted
    with pytest.raises(ValueError, match="holds no KV blocks"):
        sched.add_request(fork("b", parent, 51))  # released: no new forks
    sched.schedule()
    assert not sched.held and sched.kv_cache_manager.num_free_blocks == sched.kv_cache_manager.num_usable_blocks


def test_a_fork_waits_for_room_while_its_parent_stays_held():
    sched = scheduler(num_blocks=4)  # 3 usable blocks
    parent = held_parent(sched)  # blocks 1, 2
    sched.add_requests([fork("a", parent, 50), fork("b", parent, 51)])
    sched.release_held("p")
    out, _ = step(sched)  # a takes block 3 (copy of 2); b finds no block and waits
    assert [s.request.request_id for s in out.scheduled] == ["a"] and out.blocks_to_copy == [(2, 3)]
    assert "p" in sched.held  # b still needs it
    sched.release_held("a")  # a is held after its one token; releasing it makes room for b
    out, _ = step(sched)
    assert out.blocks_to_copy == [(2, 3)] and out.scheduled[0].block_ids == [1, 3]
    assert "p" not in sched.held

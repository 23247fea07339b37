"""LoRA in the engine's bookkeeping (pure Python): the prefix cache never shares blocks between adapters, and
the scheduler keeps at most `max_loras` distinct adapters in the running batch, passing over a request whose
adapter does not fit without losing its place."""
from __future__ import annotations

import pytest

from fovea.engine.kv_cache import KVCacheManager, hash_block_tokens, update_block_hashes
from fovea.engine.scheduler import Scheduler, SchedulerConfig
from fovea.lora.request import LoRARequest
from tests.engine import make_request
from tests.engine.test_scheduler import step, summary

BS = 4
A = LoRARequest("a", 1, "/adapters/a")
B = LoRARequest("b", 2, "/adapters/b")
C = LoRARequest("c", 3, "/adapters/c")


def lora_request(request_id, prompt, lora, **params):
    req = make_request(request_id, prompt, **params)
    req.lora_request = lora
    return req


def test_lora_request_is_validated():
    with pytest.raises(ValueError, match="lora_int_id must be an integer >= 1"):
        LoRARequest("a", 0, "/x")
    with pytest.raises(ValueError, match="lora_name"):
        LoRARequest("", 1, "/x")
    with pytest.raises(ValueError, match="lora_path"):
        LoRARequest("a", 1)


def test_block_hashes_name_the_adapter_in_every_block():
    base, with_a = make_request("r0", 8), lora_request("r1", 8, A)
    h = update_block_hashes(with_a, BS)
    h0 = hash_block_tokens(None, [0, 1, 2, 3], ["lora:1"])
    assert h == [h0, hash_block_tokens(h0, [4, 5, 6, 7], ["lora:1"])]
    assert not set(h) & set(update_block_hashes(base, BS))
    assert not set(h) & set(update_block_hashes(lora_request("r2", 8, B), BS))
    assert h == update_block_hashes(lora_request("r3", 8, A), BS)


def test_prefix_cache_shares_blocks_within_an_adapter_never_across():
    kv = KVCacheManager(21, BS)

    def admit(req):
        hits, num_hit = kv.get_computed_blocks(req)
        new = kv.allocate_slots(req, req.num_tokens - num_hit, hits)
        req.num_computed_tokens = req.num_tokens
        return [b.block_id for b in hits], [b.block_id for b in new]

    assert admit(make_request("base", 10)) == ([], [1, 2, 3])
    assert admit(lora_request("a0", 10, A)) == ([], [4, 5, 6])  # same tokens, adapter a: nothing shared
    assert admit(lora_request("b0", 10, B)) == ([], [7, 8, 9])  # adapter b: nothing shared either
    assert admit(lora_request("a1", 10, A)) == ([4, 5], [10])  # adapter a again: a's two full blocks
    assert admit(make_request("base1", 10)) == ([1, 2], [11])  # the base model: the base's
    blocks = kv.block_pool.blocks
    assert [blocks[i].ref_cnt for i in (1, 2, 4, 5, 7, 8)] == [2, 2, 2, 2, 1, 1]


def scheduler(**overrides) -> Scheduler:
    kwargs = dict(num_blocks=41, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=32)
    kwargs.update(overrides)
    return Scheduler(SchedulerConfig(**kwargs))


def test_max_loras_caps_distinct_adapters_and_passes_over_without_losing_place():
    sched = scheduler(max_loras=2)
    sched.add_request(lora_request("a", 4, A, max_tokens=1))
    sched.add_request(lora_request("b", 4, B, max_tokens=3))
    sched.add_request(lora_request("c", 4, C, max_tokens=2))  # a third adapter: waits
    sched.add_request(lora_request("a2", 4, A, max_tokens=2))  # adapter a is running: admitted past c
    sched.add_request(make_request("base", 4, max_tokens=2))  # no adapter: never limited
    out, _ = step(sched)
    assert [s[0] for s in summary(out)] == ["a", "b", "a2", "base"]
    assert [r.request_id for r in sched.waiting] == ["c"]
    out, _ = step(sched)  # "a" finished last step but "a2" still runs adapter a: c still waits
    assert [s[0] for s in summary(out)] == ["b", "a2", "base"] and [r.request_id for r in sched.waiting] == ["c"]
    out, _ = step(sched)  # a2 and base finished: adapters {b} running, so c fits now
    assert [s[0] for s in summary(out)] == ["b", "c"]


def test_without_a_limit_every_adapter_is_admitted():
    sched = scheduler()
    for i, lora in enumerate((A, B, C)):
        sched.add_request(lora_request(f"r{i}", 4, lora))
    out, _ = step(sched)
    assert [s[0] for s in summary(out)] == ["r0", "r1", "r2"]


def test_max_loras_must_be_positive():
    with pytest.raises(ValueError, match="max_loras"):
        scheduler(max_loras=0)

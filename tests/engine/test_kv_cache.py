"""The KV block pool and prefix cache, to the block (block_size 4, blocks 1..10 usable, block 0 reserved)."""
import pytest

from fovea.engine.kv_cache import BlockPool, KVCacheManager, hash_block_tokens, update_block_hashes
from tests.engine import image, make_request

BS = 4


def manager(num_blocks=11, caching=True) -> KVCacheManager:
    return KVCacheManager(num_blocks, BS, enable_prefix_caching=caching)


def free_ids(kv: KVCacheManager) -> list[int]:
    return list(kv.block_pool.free_queue)


def refs(kv: KVCacheManager, ids) -> list[int]:
    return [kv.block_pool.blocks[i].ref_cnt for i in ids]


def admit(kv: KVCacheManager, req, num_new_tokens=None):
    """Scheduler-style admission: lookup, allocate, advance num_computed_tokens."""
    hits, num_hit = kv.get_computed_blocks(req)
    num_new = req.num_tokens - num_hit if num_new_tokens is None else num_new_tokens
    new = kv.allocate_slots(req, num_new, hits)
    assert new is not None
    req.num_computed_tokens = num_hit + num_new
    return hits, new


# ---- hashing ---------------------------------------------------------------------------------------------------


def test_hash_chains_parent_tokens_and_extra_keys():
    h = hash_block_tokens(None, [1, 2, 3, 4])
    assert h == hash_block_tokens(None, [1, 2, 3, 4]) and isinstance(h, bytes) and len(h) == 32
    assert h != hash_block_tokens(None, [1, 2, 3, 5])
    assert h != hash_block_tokens(h, [1, 2, 3, 4])
    assert h != hash_block_tokens(None, [1, 2, 3, 4], ["img"])
    assert hash_block_tokens(None, [1], ["ab", "c"]) != hash_block_tokens(None, [1], ["a", "bc"])


def test_block_hashes_are_incremental_and_cover_full_blocks_only():
    req = make_request("r", 6)
    hashes = update_block_hashes(req, BS)
    assert len(hashes) == 1 and hashes is req.block_hashes
    first = hashes[0]
    req.append_output_token_ids([100, 101])  # 8 tokens: block 1 is now full
    update_block_hashes(req, BS)
    assert len(req.block_hashes) == 2 and req.block_hashes[0] is first  # not recomputed
    assert req.block_hashes[1] == hash_block_tokens(first, [4, 5, 100, 101])


def test_extra_keys_are_the_items_overlapping_each_block():
    # image A on [2, 7) overlaps blocks 0 and 1; image B on [7, 9) overlaps blocks 1 and 2; block 3 has none
    req = make_request("r", 16, mm=[image(2, 5, "A"), image(7, 2, "B")])
    hashes = update_block_hashes(req, BS)
    toks = req.all_token_ids
    h0 = hash_block_tokens(None, toks[0:4], ["A"])
    h1 = hash_block_tokens(h0, toks[4:8], ["A", "B"])
    h2 = hash_block_tokens(h1, toks[8:12], ["B"])
    h3 = hash_block_tokens(h2, toks[12:16], [])
    assert hashes == [h0, h1, h2, h3]


# ---- allocation, ref counts, free order -------------------------------------------------------------------------


def test_allocate_hands_out_blocks_in_order_and_caches_full_ones():
    kv = manager()
    assert kv.num_free_blocks == 10 and free_ids(kv) == list(range(1, 11))  # block 0 is the null block
    r0 = make_request("r0", 10)
    _, new = admit(kv, r0)
    assert [b.block_id for b in new] == [1, 2, 3] and kv.get_block_ids("r0") == [1, 2, 3]
    assert refs(kv, [1, 2, 3]) == [1, 1, 1] and kv.num_free_blocks == 7
    # two full blocks are cached, the partial third is not
    pool = kv.block_pool
    assert [pool.blocks[i].block_hash for i in (1, 2, 3)] == [*r0.block_hashes[:2], None]
    assert set(pool.cached_blocks) == set(r0.block_hashes[:2])
    # the next step's tokens fit in block 3 until it is full, then block 4 is taken
    assert kv.allocate_slots(r0, 2) == []
    r0.num_computed_tokens = 12
    assert [b.block_id for b in kv.allocate_slots(r0, 1)] == [4]


def test_same_prompt_shares_blocks_and_frees_tail_first():
    kv = manager()
    r0, r1 = make_request("r0", 10), make_request("r1", 10)
    admit(kv, r0)
    hits, new = admit(kv, r1)
    assert [b.block_id for b in hits] == [1, 2] and [b.block_id for b in new] == [4]
    assert kv.get_block_ids("r1") == [1, 2, 4]
    assert refs(kv, [1, 2, 3, 4]) == [2, 2, 1, 1] and kv.num_free_blocks == 6
    assert r1.num_computed_tokens == 10

    kv.free(r0)  # [1, 2, 3] freed in reverse: only 3 reaches zero
    assert refs(kv, [1, 2, 3]) == [1, 1, 0]
    assert free_ids(kv) == [5, 6, 7, 8, 9, 10, 3]
    kv.free(r1)  # tail first: 4, then 2, then 1
    assert free_ids(kv) == [5, 6, 7, 8, 9, 10, 3, 4, 2, 1]
    assert kv.num_free_blocks == 10


def test_hit_leaves_the_last_token_to_recompute():
    kv = manager()
    r0 = make_request("r0", 8)  # exactly two full blocks
    admit(kv, r0)
    r1 = make_request("r1", 8)
    hits, num_hit = kv.get_computed_blocks(r1)
    assert [b.block_id for b in hits] == [1] and num_hit == 4  # (8 - 1) // 4 = 1 block
    r2 = make_request("r2", 9)
    assert kv.get_computed_blocks(r2)[1] == 8


def test_same_tokens_different_image_share_nothing():
    kv = manager()
    tokens = [7] * 12
    a = make_request("a", tokens, mm=[image(0, 4, "cat")])
    b = make_request("b", tokens, mm=[image(0, 4, "dog")])
    admit(kv, a)
    assert kv.get_computed_blocks(b) == ([], 0)  # block 0 differs, and every later block chains on it
    c = make_request("c", tokens, mm=[image(0, 4, "cat")])
    assert kv.get_computed_blocks(c)[1] == 8


def test_idle_cached_block_is_hit_then_evicted_when_reused():
    kv = manager()
    r0 = make_request("r0", 10)
    admit(kv, r0)
    kv.free(r0)
    assert free_ids(kv) == [4, 5, 6, 7, 8, 9, 10, 3, 2, 1]
    # a hit pulls idle cached blocks out of the free queue and takes a reference
    r1 = make_request("r1", 10)
    hits, new = admit(kv, r1)
    assert [b.block_id for b in hits] == [1, 2] and [b.block_id for b in new] == [4]
    assert refs(kv, [1, 2]) == [1, 1] and free_ids(kv) == [5, 6, 7, 8, 9, 10, 3]
    kv.free(r1)
    assert free_ids(kv) == [5, 6, 7, 8, 9, 10, 3, 4, 2, 1]
    # a 40-token request takes all ten blocks; taking 2 and 1 evicts their hashes
    big = make_request("big", list(range(100, 140)))
    admit(kv, big)
    assert kv.get_block_ids("big") == [5, 6, 7, 8, 9, 10, 3, 4, 2, 1]
    assert set(kv.block_pool.cached_blocks) == set(big.block_hashes)
    assert kv.get_computed_blocks(make_request("r2", 10)) == ([], 0)


def test_allocation_failure_changes_nothing():
    kv = manager()
    r0 = make_request("r0", 10)
    admit(kv, r0)
    kv.free(r0)  # blocks 1, 2 idle but cached
    before = (free_ids(kv), refs(kv, range(11)))
    # 8 hit tokens + 33 new = 11 blocks, 9 of them new; the two idle hits are among the 10 free blocks,
    # so only 8 can be new
    r1 = make_request("r1", list(range(10)) + [50] * 31)
    hits, num_hit = kv.get_computed_blocks(r1)
    assert num_hit == 8
    assert kv.allocate_slots(r1, 33, hits) is None
    assert (free_ids(kv), refs(kv, range(11))) == before and kv.get_block_ids("r1") == []
    # 32 new tokens need exactly 8 new blocks: fits
    assert [b.block_id for b in kv.allocate_slots(r1, 32, hits)] == [4, 5, 6, 7, 8, 9, 10, 3]
    assert kv.get_block_ids("r1") == [1, 2, 4, 5, 6, 7, 8, 9, 10, 3] and kv.num_free_blocks == 0


def test_generated_tokens_fill_cacheable_blocks():
    kv = manager()
    r0 = make_request("r0", 3)
    admit(kv, r0)
    assert kv.block_pool.cached_blocks == {}
    r0.append_output_token_ids(42)  # the runner sampled 42; the next step feeds it
    kv.allocate_slots(r0, 1)
    r0.num_computed_tokens += 1
    assert kv.block_pool.blocks[1].block_hash == r0.block_hashes[0]
    r1 = make_request("r1", [0, 1, 2, 42, 9])
    assert kv.get_computed_blocks(r1) == ([kv.block_pool.blocks[1]], 4)


def test_concurrent_identical_prefixes_keep_one_cached_copy():
    kv = manager()
    r0, r1 = make_request("r0", 8), make_request("r1", 8)
    h0, _ = kv.get_computed_blocks(r0)
    h1, _ = kv.get_computed_blocks(r1)  # both miss before either is allocated
    kv.allocate_slots(r0, 8, h0)
    kv.allocate_slots(r1, 8, h1)
    assert kv.get_block_ids("r0") == [1, 2] and kv.get_block_ids("r1") == [3, 4]
    pool = kv.block_pool
    assert [pool.blocks[i].block_hash is None for i in (1, 2, 3, 4)] == [False, False, True, True]
    kv.free(r0)
    kv.free(r1)
    assert free_ids(kv) == [5, 6, 7, 8, 9, 10, 2, 1, 4, 3]
    assert len(pool.cached_blocks) == 2


def test_disabled_prefix_caching_never_hashes_or_hits():
    kv = manager(caching=False)
    r0, r1 = make_request("r0", 10), make_request("r1", 10)
    admit(kv, r0)
    assert kv.get_computed_blocks(r1) == ([], 0)
    admit(kv, r1)
    assert kv.get_block_ids("r1") == [4, 5, 6]
    assert r0.block_hashes == [] and kv.block_pool.cached_blocks == {}
    assert kv.prefix_cache_queries == 0


def test_hit_counters_count_each_admission_once():
    kv = manager()
    admit(kv, make_request("r0", 10))
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (10, 0)
    r1 = make_request("r1", 10)
    kv.get_computed_blocks(r1)
    kv.get_computed_blocks(r1)  # a lookup alone counts nothing
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (10, 0)
    admit(kv, r1)
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (20, 8)


def test_reset_prefix_cache_only_when_idle():
    kv = manager()
    r0 = make_request("r0", 10)
    admit(kv, r0)
    assert kv.reset_prefix_cache() is False and len(kv.block_pool.cached_blocks) == 2
    kv.free(r0)
    assert kv.reset_prefix_cache() is True
    assert kv.block_pool.cached_blocks == {} and all(b.block_hash is None for b in kv.block_pool.blocks)
    assert kv.get_computed_blocks(make_request("r1", 10)) == ([], 0)


def test_pool_rejects_misuse():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(1)
    pool = BlockPool(3)
    with pytest.raises(ValueError):
        pool.get_new_blocks(3)
    (block,) = pool.get_new_blocks(1)
    pool.free_blocks([block])
    with pytest.raises(RuntimeError):
        pool.free_blocks([block])

"""Encoder-output bookkeeping: references per (request, item), capacity in encoder tokens, freed hashes."""
import pytest

from fovea.engine.encoder_cache import EncoderCacheManager
from tests.engine import image, make_request


def test_allocate_reference_and_free():
    cache = EncoderCacheManager(cache_size=10)
    a = make_request("a", 20, mm=[image(0, 6, "x"), image(8, 8, "y", num_embeds=4)])
    assert not cache.check_and_update_cache(a, 0)
    assert cache.can_allocate(a, 0, encoder_budget=10)
    cache.allocate(a, 0)
    assert cache.num_free_slots == 4 and "x" in cache and cache.has_cache(a, 0)
    # item 1 occupies its 4 embeddings, not its 8 placeholder positions
    assert cache.can_allocate(a, 1, encoder_budget=4)
    assert not cache.can_allocate(a, 1, encoder_budget=3)  # over the step's encoder budget
    assert not cache.can_allocate(a, 1, encoder_budget=10, num_planned_tokens=1)  # over the free space
    cache.allocate(a, 1)
    assert cache.num_free_slots == 0 and cache.get_cached_input_ids(a) == {0, 1}
    with pytest.raises(ValueError):
        cache.allocate(a, 1)

    cache.free_encoder_input(a, 0)
    assert cache.num_free_slots == 6 and "x" not in cache
    assert cache.get_freed_mm_hashes() == ["x"]
    assert cache.get_freed_mm_hashes() == []  # reported once
    cache.free(a)
    assert cache.num_free_slots == 10 and "x" not in cache and "y" not in cache
    assert cache.get_freed_mm_hashes() == ["y"]


def test_shared_hash_lives_until_the_last_reference():
    cache = EncoderCacheManager(cache_size=10)
    a = make_request("a", 10, mm=[image(2, 4, "same")])
    b = make_request("b", 12, mm=[image(5, 4, "same")])
    cache.allocate(a, 0)
    assert cache.check_and_update_cache(b, 0)  # no second encode, no second charge
    assert cache.num_free_slots == 6
    cache.free(a)
    assert "same" in cache and cache.get_freed_mm_hashes() == []
    cache.free_encoder_input(b, 0)
    assert "same" not in cache and cache.num_free_slots == 10
    assert cache.get_freed_mm_hashes() == ["same"]


def test_two_items_of_one_request_with_one_hash():
    cache = EncoderCacheManager(cache_size=10)
    a = make_request("a", 20, mm=[image(0, 4, "h"), image(10, 4, "h")])
    cache.allocate(a, 0)
    assert cache.check_and_update_cache(a, 1)
    cache.free_encoder_input(a, 0)
    assert "h" in cache  # item 1 still needs it
    cache.free_encoder_input(a, 1)
    assert "h" not in cache


def test_freed_then_taken_again_is_not_reported():
    cache = EncoderCacheManager(cache_size=10)
    a, b = make_request("a", 10, mm=[image(0, 4, "h")]), make_request("b", 10, mm=[image(0, 4, "h")])
    cache.allocate(a, 0)
    cache.free(a)
    cache.allocate(b, 0)  # recomputed this step: the runner overwrites rather than deletes
    assert cache.get_freed_mm_hashes() == []


def test_unknown_frees_are_ignored():
    cache = EncoderCacheManager(cache_size=4)
    a = make_request("a", 10, mm=[image(0, 4, "h")])
    cache.free_encoder_input(a, 0)
    cache.free(a)
    assert cache.num_free_slots == 4
    with pytest.raises(ValueError):
        EncoderCacheManager(-1)

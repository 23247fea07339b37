"""Bookkeeping for encoder outputs (vision-tower embeddings) kept between steps, keyed by content hash.

Pure Python: the runner owns the tensors. An item's output is computed whole, once, in the step whose chunk
first overlaps its placeholders, and must stay until every request using it has computed all of its
placeholder tokens (after that the information lives in the KV cache). Capacity is counted in encoder-output
tokens (`MultiModalFeature.num_encoder_tokens`).

Each entry is referenced by the (request_id, item index) pairs that need it, so two requests (or two
items of one request) with the same `mm_hash` share one entry and one encoder run. An entry is freed the
moment its last reference goes (no keep-alive of idle outputs); its hash is then reported once by
`get_freed_mm_hashes` so the runner can drop the tensor. The runner looks outputs up by `mm_hash`.
"""
from __future__ import annotations

from fovea.engine.request import Request


class EncoderCacheManager:
    def __init__(self, cache_size: int):
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.cache_size = cache_size
        self.num_free_slots = cache_size
        self._refs: dict[str, set[tuple[str, int]]] = {}  # mm_hash -> {(request_id, item index)}
        self._num_tokens: dict[str, int] = {}  # mm_hash -> encoder tokens it occupies
        self._req_items: dict[str, set[int]] = {}  # request_id -> item indices it references
        self._freed: dict[str, None] = {}  # ordered set of hashes freed since the last report
        # For metrics, since start: a request taking a reference to an output already cached (or planned this
        # step) is a hit; an output that has to be computed (`allocate`) is a miss.
        self.num_hits = 0
        self.num_misses = 0

    def __contains__(self, mm_hash: str) -> bool:
        return mm_hash in self._refs

    @property
    def num_queries(self) -> int:
        return self.num_hits + self.num_misses

    def _add_ref(self, request: Request, idx: int, mm_hash: str) -> None:
        self._refs[mm_hash].add((request.request_id, idx))
        self._req_items.setdefault(request.request_id, set()).add(idx)

    def has_cache(self, request: Request, idx: int) -> bool:
        """Whether this request already holds a reference to item `idx`."""
        return idx in self._req_items.get(request.request_id, ())

    def check_and_update_cache(self, request: Request, idx: int) -> bool:
        """If item `idx`'s output is cached (or being computed this step), reference it and return True."""
        mm_hash = request.mm_features[idx].mm_hash
        if mm_hash not in self._refs:
            return False
        if not self.has_cache(request, idx):
            self.num_hits += 1
        self._add_ref(request, idx, mm_hash)
        return True

    def can_allocate(self, request: Request, idx: int, encoder_budget: int, num_planned_tokens: int = 0) -> bool:
        """Whether item `idx` fits both this step's remaining encoder budget and the free cache space, after
        `num_planned_tokens` already planned (not yet allocated) for the same request this step."""
        num_tokens = request.mm_features[idx].num_encoder_tokens
        return num_tokens <= encoder_budget and num_planned_tokens + num_tokens <= self.num_free_slots

    def allocate(self, request: Request, idx: int) -> None:
        """Reserve space for item `idx`'s output (to be computed this step) and reference it."""
        feature = request.mm_features[idx]
        if feature.mm_hash in self._refs:
            raise ValueError(f"{feature.mm_hash} is already cached; use check_and_update_cache")
        if feature.num_encoder_tokens > self.num_free_slots:
            raise ValueError(f"{feature.num_encoder_tokens} encoder tokens do not fit in {self.num_free_slots} free")
        self.num_free_slots -= feature.num_encoder_tokens
        self.num_misses += 1
        self._refs[feature.mm_hash] = set()
        self._num_tokens[feature.mm_hash] = feature.num_encoder_tokens
        self._add_ref(request, idx, feature.mm_hash)
        # freed and taken again before the runner heard of it: the runner just recomputes it in place
        self._freed.pop(feature.mm_hash, None)

    def get_cached_input_ids(self, request: Request) -> set[int]:
        return set(self._req_items.get(request.request_id, ()))

    def free_encoder_input(self, request: Request, idx: int) -> None:
        """Drop the request's reference to item `idx`; the entry goes when nobody references it."""
        items = self._req_items.get(request.request_id)
        if items is None or idx not in items:
            return
        items.discard(idx)
        if not items:
            del self._req_items[request.request_id]
        mm_hash = request.mm_features[idx].mm_hash
        refs = self._refs[mm_hash]
        refs.discard((request.request_id, idx))
        if not refs:
            del self._refs[mm_hash]
            self.num_free_slots += self._num_tokens.pop(mm_hash)
            self._freed[mm_hash] = None

    def free(self, request: Request) -> None:
        for idx in sorted(self._req_items.get(request.request_id, ())):
            self.free_encoder_input(request, idx)

    def get_freed_mm_hashes(self) -> list[str]:
        freed = list(self._freed)
        self._freed.clear()
        return freed

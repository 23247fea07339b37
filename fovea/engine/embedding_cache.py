"""Embeddings kept between `LLM.embed` calls, by image content: a repeated image skips the vision tower.

The generation engine's encoder cache (encoder_cache.py) holds an output only while a running request needs it;
an embedding is the whole answer of a call that is already over, so these are kept least recently used first,
capacity counted in rows (a row is an encoder-output token: the same unit as `EngineConfig.encoder_cache_size`,
which sizes this cache too). Keys are (pooling, content hash): the stages of one image are separate entries.
"""
from __future__ import annotations

from collections import OrderedDict

import torch


class EmbeddingCache:
    def __init__(self, max_rows: int):
        if max_rows < 0:
            raise ValueError(f"max_rows must be >= 0, got {max_rows}")
        self.max_rows = max_rows
        self.num_rows = 0
        self._entries: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self.num_hits = 0
        self.num_misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, pooling: str, mm_hash: str) -> torch.Tensor | None:
        """The cached (rows, dim) embedding, or None (counted as a hit or a miss)."""
        key = (pooling, mm_hash)
        embedding = self._entries.get(key)
        if embedding is None:
            self.num_misses += 1
            return None
        self._entries.move_to_end(key)
        self.num_hits += 1
        return embedding

    def put(self, pooling: str, mm_hash: str, embedding: torch.Tensor) -> None:
        """Keep `embedding`, evicting the least recently used until it fits; one larger than the whole cache is
        not kept."""
        rows = embedding.shape[0]
        if rows > self.max_rows:
            return
        key = (pooling, mm_hash)
        if key in self._entries:
            self.num_rows -= self._entries.pop(key).shape[0]
        while self.num_rows + rows > self.max_rows:
            self.num_rows -= self._entries.popitem(last=False)[1].shape[0]
        self._entries[key] = embedding
        self.num_rows += rows

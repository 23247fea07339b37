"""Embeddings kept between `LLM.embed` calls, by image content: a repeated image skips the vision tower.

The generation engine's encoder cache (encoder_cache.py) holds an output only while a running request needs it;
an embedding is the whole answer of a call that is already over, so these are kept least recently used first,
capacity counted in rows (a row is an encoder-output token: the same unit as `EngineConfig.encoder_cache_size`,
which sizes this cache too). Keys are (pooling, content hash): the stages of one image are separate entries.
`embed_through_cache` is the one way callers use it: the generation engine's `LLM.embed` (fovea.engine.pooling)
and a stage-1 export's `LLM.embed` and `LLM.score` (fovea.engine.retrieval).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

import torch
from PIL import Image

from fovea.multimodal.hashing import hash_mm_item


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


def embed_through_cache(cache: EmbeddingCache | None, pooling: str, images: Sequence[Image.Image],
                        embed: Callable[[list[Image.Image]], Iterable[torch.Tensor]]) -> list[torch.Tensor]:
    """One (rows, dim) embedding per image: those `cache` holds under (pooling, content hash), and the distinct
    others from one call of `embed` (a list of images -> their embeddings in order), which are then kept. An image
    repeated within the call runs once. Each result is the caller's own copy."""
    hashes = [hash_mm_item("image", image) for image in images]
    found = {}
    for mm_hash in dict.fromkeys(hashes):
        if cache is not None and (embedding := cache.get(pooling, mm_hash)) is not None:
            found[mm_hash] = embedding
    missing = {h: image for h, image in zip(hashes, images) if h not in found}
    if missing:
        for mm_hash, embedding in zip(missing, embed(list(missing.values())), strict=True):
            found[mm_hash] = embedding
            if cache is not None:
                cache.put(pooling, mm_hash, embedding)
    # copies: a caller writing into its result must not change the cache (or another input's result)
    return [found[h].clone() for h in hashes]

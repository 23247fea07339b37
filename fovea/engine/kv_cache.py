"""The KV block pool: block tables, ref counts, an LRU free queue and the prefix-cache hash chain.

Pure Python (no torch): the runner owns the tensors and only ever sees block ids.

Layout. The pool has `num_blocks` blocks of `block_size` tokens. Block 0 is the *null block*: it is never
handed out, so the runner may pad block tables and KV slot lists with 0 without touching anyone's data.
`num_blocks - 1` blocks are usable.

Free queue. Blocks with ref count 0 wait in an ordered queue; allocation takes from the head, freeing appends
to the tail, so blocks are reused least-recently-freed first. A request frees its blocks tail first: the end
of a sequence is the part least likely to be shared, so it should be evicted before its prefix.

Prefix caching. A *full* block's hash chains the previous block's hash, the block's token ids, the
`mm_hash` of every multimodal item whose placeholder range overlaps the block (two prompts that differ only in
their image share no block) and the LoRA adapter the request runs (the same tokens under two adapters, or an
adapter and the base model, have different KV, so they share no block either). A block is registered under its hash as soon as it is allocated for the step
that fills it: the runner writes the whole step's KV before any request attends to it (see
`fovea.layers.attention`), so a request admitted later in the same step may already share it. A cached block
whose ref count drops to 0 stays findable while it sits in the free queue; it loses its hash only when it is
taken for something else.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fovea.engine.request import MultiModalFeature, Request

BlockHash = bytes
_ROOT_HASH: BlockHash = hashlib.sha256(b"fovea-prefix-cache-root").digest()


def hash_block_tokens(
    parent_hash: BlockHash | None, token_ids: Sequence[int], extra_keys: Sequence[str] = ()
) -> BlockHash:
    """sha256 digest (32 bytes) of one full block, chained on the previous block's hash.

    sha256 rather than Python's `hash`: a collision would silently serve another prompt's KV, and the digest
    is the same in every process (no PYTHONHASHSEED dependence). Lengths prefix every variable-size field,
    so no two different inputs share an encoding.
    """
    h = hashlib.sha256(parent_hash if parent_hash is not None else _ROOT_HASH)
    h.update(len(token_ids).to_bytes(4, "little"))
    h.update(array("q", token_ids).tobytes())
    for key in extra_keys:
        raw = key.encode()
        h.update(len(raw).to_bytes(4, "little"))
        h.update(raw)
    return h.digest()


def _block_extra_keys(features: list[MultiModalFeature], start: int, end: int, first: int) -> tuple[list[str], int]:
    """mm_hashes of the items overlapping tokens [start, end), and the first item that may overlap later blocks.

    `features` are sorted by offset and do not overlap (the scheduler checks), so a cursor suffices.
    """
    while first < len(features) and features[first].offset + features[first].length <= start:
        first += 1
    keys = []
    for f in features[first:]:
        if f.offset >= end:
            break
        keys.append(f.mm_hash)
    return keys, first


def update_block_hashes(request: Request, block_size: int) -> list[BlockHash]:
    """Extend `request.block_hashes` to cover every full block of known tokens; hashes are never recomputed."""
    hashes = request.block_hashes
    num_full_blocks = request.num_tokens // block_size
    if len(hashes) >= num_full_blocks:
        return hashes
    tokens, features = request.all_token_ids, request.mm_features
    lora = request.lora_request
    parent = hashes[-1] if hashes else None
    cursor = 0
    for i in range(len(hashes), num_full_blocks):
        start, end = i * block_size, (i + 1) * block_size
        extra, cursor = _block_extra_keys(features, start, end, cursor) if features else ([], 0)
        if lora is not None:  # the chain alone would carry it on; every block names it, as vLLM's hashes do
            extra = [*extra, lora.cache_key]
        parent = hash_block_tokens(parent, tokens[start:end], extra)
        hashes.append(parent)
    return hashes


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None  # set while the block is registered in the prefix cache


class BlockPool:
    """Blocks, their ref counts, the free queue and the hash -> block map. Knows nothing about requests."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is the reserved null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[0]
        self.null_block.ref_cnt = 1  # pinned: never freed, never handed out
        # head = next to reuse; an OrderedDict gives O(1) popleft, append and removal from the middle
        self.free_queue: OrderedDict[int, KVCacheBlock] = OrderedDict((b.block_id, b) for b in self.blocks[1:])
        self.cached_blocks: dict[BlockHash, KVCacheBlock] = {}

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody references, cached or not (cached ones are evictable)."""
        return len(self.free_queue)

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        return self.cached_blocks.get(block_hash)

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take `num_blocks` from the head of the free queue, evicting their cached hashes; ref count 1 each."""
        if num_blocks > len(self.free_queue):
            raise ValueError(f"cannot take {num_blocks} blocks, only {len(self.free_queue)} free")
        out = []
        for _ in range(num_blocks):
            _, block = self.free_queue.popitem(last=False)
            if block.block_hash is not None:
                del self.cached_blocks[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take another reference to cached blocks (a prefix hit), pulling idle ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference each; blocks reaching 0 join the free queue in the given order (first = reused first)."""
        for block in ordered_blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = block
            elif block.ref_cnt < 0:
                raise RuntimeError(f"block {block.block_id} freed more often than allocated")

    def cache_block(self, block: KVCacheBlock, block_hash: BlockHash) -> None:
        """Register a full, computed (or being computed this step) block under its hash.

        If another block already holds this hash (two requests computed the same prefix at once), the first
        one stays the cached copy and this block stays anonymous; it is freed like any other.
        """
        if block.block_hash is not None or block_hash in self.cached_blocks:
            return
        block.block_hash = block_hash
        self.cached_blocks[block_hash] = block

    def uncache_block(self, block: KVCacheBlock) -> None:
        """Forget one block's hash (its contents cannot be trusted); the block itself is untouched."""
        if block.block_hash is not None and self.cached_blocks.get(block.block_hash) is block:
            del self.cached_blocks[block.block_hash]
        block.block_hash = None

    def reset_prefix_cache(self) -> bool:
        """Forget every hash (e.g. after new weights). Refused (False) while any block is in use, as in vLLM."""
        if self.num_free_blocks != self.num_usable_blocks:
            return False
        for block in self.cached_blocks.values():
            block.block_hash = None
        self.cached_blocks.clear()
        return True


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Per-request block tables on top of a `BlockPool`.

    Typical use by the scheduler:
      admission:  blocks, n = get_computed_blocks(req); allocate_slots(req, k, blocks)  (req.num_computed_tokens = 0)
      later step: allocate_slots(req, k)
      finish or preemption: free(req)
    `allocate_slots` returns the new blocks (possibly []), or None with nothing changed when the pool is short.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_pool = BlockPool(num_blocks)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # encoder-decoder requests: blocks holding the encoder output's cross-attention K/V, taken at admission
        # with the first decoder blocks and kept until finish or preemption; never prefix-cached
        self.req_to_cross_blocks: dict[str, list[KVCacheBlock]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # leading blocks of the request already registered
        # prefix-cache counters, in tokens: queried = all tokens of admitted requests, hits = tokens served
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def num_usable_blocks(self) -> int:
        return self.block_pool.num_usable_blocks

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of the request, in full blocks, and its length in tokens.

        Never the whole request: the last token is always recomputed to get its logits. Pure lookup, no ref taken.
        """
        if not self.enable_prefix_caching or request.encoder_prompt_token_ids is not None:
            return [], 0  # encoder-decoder: the decoder's KV depends on the encoder input, which no hash holds
        hashes = update_block_hashes(request, self.block_size)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in hashes[:max_hit_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: list[KVCacheBlock] | None = None,
        num_cross_tokens: int = 0,
    ) -> list[KVCacheBlock] | None:
        """Make room for `num_new_tokens` after the request's computed tokens (and after `new_computed_blocks`).

        `new_computed_blocks` is the prefix hit from `get_computed_blocks`, passed once, when the request is
        admitted (it then has no blocks and `num_computed_tokens == 0`); the lookup is counted in the hit-rate
        counters then, so a request stuck at the head of the queue is not counted every step.
        `num_cross_tokens` (encoder-decoder admission): also take the request's cross blocks for that many
        encoder positions, all or nothing together with the decoder's (`get_cross_block_ids`).
        Returns the newly taken blocks, or None (and changes nothing) if the free queue is too short.
        """
        if num_new_tokens < 1:
            raise ValueError(f"num_new_tokens must be >= 1, got {num_new_tokens}")
        computed = new_computed_blocks or []
        blocks = self.req_to_blocks.get(request.request_id, [])
        if computed and (blocks or request.num_computed_tokens):
            raise ValueError(f"request {request.request_id}: a prefix hit is only taken at admission")
        num_computed_tokens = request.num_computed_tokens + len(computed) * self.block_size
        num_required = _cdiv(num_computed_tokens + num_new_tokens, self.block_size)
        num_new_blocks = max(0, num_required - len(blocks) - len(computed))
        # idle hit blocks leave the free queue when touched, so they cannot also serve as new blocks
        num_idle_hits = sum(1 for b in computed if b.ref_cnt == 0)
        num_cross_blocks = _cdiv(num_cross_tokens, self.block_size)
        if num_cross_blocks and request.request_id in self.req_to_cross_blocks:
            raise ValueError(f"request {request.request_id}: cross blocks are taken once, at admission")
        if num_new_blocks + num_cross_blocks > self.block_pool.num_free_blocks - num_idle_hits:
            return None
        if num_cross_blocks:
            self.req_to_cross_blocks[request.request_id] = self.block_pool.get_new_blocks(num_cross_blocks)

        if new_computed_blocks is not None and self.enable_prefix_caching:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(computed) * self.block_size
        self.block_pool.touch(computed)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
        if request.request_id not in self.req_to_blocks:
            self.req_to_blocks[request.request_id] = blocks
            self.num_cached_blocks[request.request_id] = len(computed)
        blocks.extend(computed)
        blocks.extend(new_blocks)
        self.cache_full_blocks(request, min(num_computed_tokens + num_new_tokens, request.num_tokens))
        return new_blocks

    def cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Register the request's full blocks among its first `num_tokens` tokens (prompt or generated)."""
        if (not self.enable_prefix_caching or request.request_id not in self.req_to_blocks
                or request.encoder_prompt_token_ids is not None):
            return
        first = self.num_cached_blocks[request.request_id]
        num_full_blocks = num_tokens // self.block_size
        if num_full_blocks <= first:
            return
        hashes = update_block_hashes(request, self.block_size)
        blocks = self.req_to_blocks[request.request_id]
        for i in range(first, num_full_blocks):
            self.block_pool.cache_block(blocks[i], hashes[i])
        self.num_cached_blocks[request.request_id] = num_full_blocks

    def fork(self, child: Request, parent: Request, num_new_tokens: int
             ) -> tuple[list[KVCacheBlock], tuple[int, int] | None] | None:
        """Give `child` the KV of `parent`'s first `child.num_computed_tokens` tokens without computing it.

        The full blocks are shared (one more reference each); the partial last block, which the child will
        write into, is copied to a fresh block (copy-on-write). Then room is made for `num_new_tokens`. An
        encoder-decoder parent's cross blocks are shared too (they are only read after admission).
        Returns (the child's new blocks, the (source, destination) copy or None), or None with nothing changed
        when the pool is short. The parent must still hold its blocks (`Request.hold_kv`).
        """
        if child.request_id in self.req_to_blocks:
            raise ValueError(f"request {child.request_id}: a fork is only taken at admission")
        parent_blocks = self.req_to_blocks[parent.request_id]
        num_computed = child.num_computed_tokens
        num_full, num_partial = divmod(num_computed, self.block_size)
        if num_full + (num_partial > 0) > len(parent_blocks):
            raise ValueError(f"fork {child.request_id}: its parent {parent.request_id} holds only "
                             f"{len(parent_blocks)} blocks, fewer than {num_computed} tokens need")
        shared = parent_blocks[:num_full]
        num_required = _cdiv(num_computed + num_new_tokens, self.block_size)
        num_new_blocks = num_required - num_full
        if num_new_blocks > self.block_pool.num_free_blocks:
            return None
        self.block_pool.touch(shared)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
        copy = (parent_blocks[num_full].block_id, new_blocks[0].block_id) if num_partial else None
        self.req_to_blocks[child.request_id] = [*shared, *new_blocks]
        cross = self.req_to_cross_blocks.get(parent.request_id)
        if cross:  # encoder-decoder: the beams read one encoder output, so its cross blocks are shared whole
            self.block_pool.touch(cross)
            self.req_to_cross_blocks[child.request_id] = list(cross)
        # the shared full blocks are registered already (when the parent computed them), or caching is off
        self.num_cached_blocks[child.request_id] = num_full
        if len(child.block_hashes) < num_full and len(parent.block_hashes) >= num_full:
            child.block_hashes = list(parent.block_hashes[:num_full])  # same tokens, same hashes
        self.cache_full_blocks(child, min(num_computed + num_new_tokens, child.num_tokens))
        return new_blocks, copy

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first. Its block hashes stay on the request (they depend only on
        its tokens), so a preempted request need not rehash when it comes back."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        self.block_pool.free_blocks(reversed(blocks))
        self.block_pool.free_blocks(reversed(self.req_to_cross_blocks.pop(request.request_id, [])))

    def uncache_blocks(self, request: Request, num_valid_tokens: int) -> None:
        """Forget the hashes of the request's blocks past its first `num_valid_tokens` tokens: they were
        registered when allocated, but the step meant to write them failed, so their contents are not what the
        hash says. The blocks stay the request's; only future prefix hits on them are lost."""
        blocks = self.req_to_blocks.get(request.request_id, [])
        first = num_valid_tokens // self.block_size
        for block in blocks[first:]:
            self.block_pool.uncache_block(block)
        if request.request_id in self.num_cached_blocks:
            self.num_cached_blocks[request.request_id] = min(first, self.num_cached_blocks[request.request_id])

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, ())]

    def get_cross_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_cross_blocks.get(request_id, ())]

    def reset_prefix_cache(self) -> bool:
        return self.block_pool.reset_prefix_cache()

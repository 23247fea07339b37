"""Scheduling rules of encoder-decoder requests (T5, BLIP-2 / InstructBLIP over Flan-T5). Pure Python.

Such a request carries two prompts: the encoder's (`Request.encoder_prompt_token_ids`, the user's text with
any image placeholders) and the decoder's (`prompt_token_ids` = [decoder_start_token_id]). The scheduler
counts the decoder's tokens as it counts a decoder-only model's; on top of that:

- the encoder runs whole, once, in the step that admits the request (again after a preemption: its cross
  blocks were freed with the rest, and recomputing is what preemption means). It costs its prompt length
  plus the encoder tokens of any image it must encode, against the step's encoder budget
  (`max_num_encoder_input_tokens`); a request whose cost can never fit is refused when added;
- its images are encoded in that same step and released right after it (their rows are in the encoder's
  input, and the encoder's output lives on as cross-attention K/V);
- at admission it takes ceil(encoder_len / block_size) *cross blocks* from the same pool as its decoder
  blocks, all or nothing together with them (`KVCacheManager.allocate_slots(num_cross_tokens=...)`), and holds
  them until it finishes, is aborted or is preempted;
- prefix caching does not apply: the decoder's prompt is one token, and its KV depends on the encoder input,
  which a block hash of decoder tokens does not hold (so two requests never share a block).
"""
from __future__ import annotations

from fovea.engine.encoder_cache import EncoderCacheManager
from fovea.engine.request import Request


def encoder_cost(request: Request) -> int:
    """Encoder tokens the request's admission step computes: its prompt, and each distinct image in it."""
    per_hash = {f.mm_hash: f.num_encoder_tokens for f in request.mm_features}
    return request.num_encoder_tokens + sum(per_hash.values())


def check_encoder_prompt(request: Request, max_num_encoder_input_tokens: int, encoder_cache_size: int,
                         block_size: int, num_decoder_blocks: int, num_usable_blocks: int) -> None:
    """ValueError naming the limit if the request could never be admitted."""
    rid = request.request_id
    if not request.encoder_prompt_token_ids:
        raise ValueError(f"request {rid!r} has an empty encoder prompt")
    cost = encoder_cost(request)
    if cost > max_num_encoder_input_tokens:
        raise ValueError(
            f"request {rid!r}: its encoder step computes {cost} encoder tokens ({request.num_encoder_tokens} prompt "
            f"tokens and its images), over max_num_encoder_input_tokens={max_num_encoder_input_tokens}")
    num_items = sum({f.mm_hash: f.num_encoder_tokens for f in request.mm_features}.values())
    if num_items > encoder_cache_size:
        raise ValueError(f"request {rid!r}: its images' {num_items} encoder tokens exceed "
                         f"encoder_cache_size={encoder_cache_size}")
    num_cross = -(-request.num_encoder_tokens // block_size)
    if num_cross + num_decoder_blocks > num_usable_blocks:
        raise ValueError(
            f"request {rid!r} may need {num_decoder_blocks} decoder KV blocks and {num_cross} cross-attention "
            f"blocks but the pool has {num_usable_blocks}; raise num_blocks or lower max_tokens / the prompt")


def plan_encoder_prompt(encoder_cache: EncoderCacheManager, request: Request,
                        encoder_budget: int) -> tuple[int, list[int], list[int]]:
    """(encoder tokens it costs, items to encode, items sharing an output encoded by an earlier one) for
    admitting `request` this step; cost 0 when it does not fit the remaining budget or the cache. Cached
    items are referenced right away (the caller frees the references if it does not admit the request)."""
    to_encode: list[int] = []
    to_share: list[int] = []
    planned: set[str] = set()
    cost = request.num_encoder_tokens
    num_planned = 0
    for idx, f in enumerate(request.mm_features):
        if encoder_cache.check_and_update_cache(request, idx):
            continue
        if f.mm_hash in planned:
            to_share.append(idx)
            continue
        if not encoder_cache.can_allocate(request, idx, encoder_budget - cost - num_planned, num_planned):
            return 0, [], []
        to_encode.append(idx)
        planned.add(f.mm_hash)
        num_planned += f.num_encoder_tokens
    if cost + num_planned > encoder_budget:
        return 0, [], []
    return cost + num_planned, to_encode, to_share

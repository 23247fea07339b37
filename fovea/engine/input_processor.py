"""Prompt + media -> Request: tokenize, load and preprocess media, expand placeholders, hash items, and (for
M-RoPE models) compute the prompt's [3, N] positions; also the worst-case multimodal items for memory profiling.

Everything a request can get wrong is found here, before it reaches the scheduler, and raised as a
ValueError naming the problem; nothing else in the engine is touched by a bad request.

What `multi_modal_data` may hold, per modality (one item, or a list of items):

- "image": anything `load_image` takes (PIL, array, path, bytes, data URL), or precomputed embeddings: a
  torch tensor (BLIP-2) or a dict such as {"image_embeds": [tokens, hidden], "image_grid_thw": (t, h, w)}
  (Qwen2.5-VL), passed to the model's processor as they are.
- "video": a `LoadedVideo`, a (T, H, W, 3) array, a list of images (one video: a list whose items are all
  PIL images is its frames, as in vLLM; wrap it in another list for several), a file path, bytes or a
  data URL, decoded by the model's loader with its `fps` / `max_frames` options (per model and per request);
  or a dict of precomputed {"video_embeds", "video_grid_thw", "second_per_grid_ts"}.

Items are decoded here, once, and hashed decoded, so the same picture or clip hashes the same however it
arrived, and different content or different processing options hash differently.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from PIL import Image

from fovea.engine.request import MultiModalFeature, Request
from fovea.multimodal.hashing import hash_mm_item
from fovea.multimodal.media import load_image, load_video
from fovea.multimodal.processing import BaseMultiModalProcessor
from fovea.sampling_params import SamplingParams

PromptType = str | list[int] | Mapping[str, Any]
# (prompt token ids, features) -> ([3, num_tokens] positions, delta for later tokens); see SupportsMRoPE
MRoPEPositionsFn = Callable[[list[int], list[MultiModalFeature]], tuple[Any, int]]
_PROMPT_KEYS = {"prompt", "prompt_token_ids", "multi_modal_data", "mm_processor_kwargs"}


class InputProcessor:
    def __init__(self, *, tokenizer: Any, processor: BaseMultiModalProcessor | None, max_model_len: int,
                 vocab_size: int, mm_limits: Mapping[str, int], mm_processor_kwargs: Mapping[str, Any] | None,
                 eos_token_id: int | None, mrope_positions: MRoPEPositionsFn | None = None,
                 decoder_start_token_id: int | None = None):
        self.tokenizer = tokenizer
        self.processor = processor
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.mm_limits = dict(mm_limits)
        self.mm_processor_kwargs = dict(mm_processor_kwargs or {})
        self.eos_token_id = eos_token_id
        self.mrope_positions = mrope_positions
        # encoder-decoder models: the prompt is the encoder's; the decoder starts from this one token
        self.decoder_start_token_id = decoder_start_token_id

    def process(self, request_id: str, prompt: PromptType, params: SamplingParams, arrival_index: int = 0) -> Request:
        """The request for `prompt`, ready for the scheduler; ValueError naming what is wrong otherwise.
        `max_tokens=None` is resolved here to what the context leaves (on a copy of `params`)."""
        text, token_ids, mm_data, mm_kwargs = self._parse(prompt)
        kwargs = {**self.mm_processor_kwargs, **mm_kwargs}
        mm_items = self._load_media(mm_data, kwargs)
        if mm_items and self.processor is None:
            raise ValueError(f"this model takes text only; got {', '.join(mm_items)} input")
        if self.processor is not None:  # text-only prompts too: the processor checks for stray placeholders
            hashes = {m: [hash_mm_item(m, item, **kwargs) for item in items] for m, items in mm_items.items()}
            inputs = self.processor.apply(text if text is not None else token_ids, mm_items, hashes, kwargs)
            token_ids, features = inputs.prompt_token_ids, inputs.mm_features
        else:
            if token_ids is None:
                token_ids = list(self.tokenizer(text).input_ids)
            features = []
        encoder_ids = None
        if self.decoder_start_token_id is not None:
            encoder_ids, token_ids = token_ids, [self.decoder_start_token_id]
            self._check_tokens(encoder_ids, params, is_encoder=True)
        self._check_tokens(token_ids, params)
        if params.max_tokens is None:
            params = params.clone()
            params.max_tokens = self.max_model_len - len(token_ids)
        request = Request(request_id=request_id, prompt_token_ids=token_ids, sampling_params=params,
                          eos_token_id=self.eos_token_id, mm_features=features, prompt=text,
                          arrival_index=arrival_index, encoder_prompt_token_ids=encoder_ids)
        if self.mrope_positions is not None:
            request.mrope_positions, request.mrope_position_delta = self.mrope_positions(token_ids, features)
        return request

    def _parse(self, prompt: PromptType):
        if isinstance(prompt, str):
            return prompt, None, {}, {}
        if isinstance(prompt, (list, tuple)):
            return None, list(prompt), {}, {}
        if not isinstance(prompt, Mapping):
            raise ValueError(f"a prompt must be a str, a list of token ids or a dict; got {type(prompt).__name__}")
        unknown = set(prompt) - _PROMPT_KEYS
        if unknown:
            raise ValueError(f"unknown prompt key(s) {sorted(unknown)}; valid keys: {sorted(_PROMPT_KEYS)}")
        text, token_ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
        if (text is None) == (token_ids is None):
            raise ValueError("a prompt dict needs exactly one of 'prompt' (text) or 'prompt_token_ids'")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"'prompt' must be a str; got {type(text).__name__}")
        return text, (list(token_ids) if token_ids is not None else None), \
            dict(prompt.get("multi_modal_data") or {}), dict(prompt.get("mm_processor_kwargs") or {})

    def _load_media(self, mm_data: Mapping[str, Any], kwargs: Mapping[str, Any]) -> dict[str, list[Any]]:
        items: dict[str, list[Any]] = {}
        for modality, value in mm_data.items():
            if modality not in self.mm_limits:
                allowed = ", ".join(self.mm_limits) or "none (text only)"
                raise ValueError(f"this model does not take {modality!r} input; modalities it takes: {allowed}")
            values = _as_items(modality, value)
            if len(values) > self.mm_limits[modality]:
                raise ValueError(
                    f"{len(values)} {modality} item(s) given but at most {self.mm_limits[modality]} per prompt are allowed"
                )
            loaded = [self._load_item(modality, v, kwargs) for v in values]
            if loaded:
                items[modality] = loaded
        return items

    def _load_item(self, modality: str, item: Any, kwargs: Mapping[str, Any]) -> Any:
        if isinstance(item, Mapping):  # precomputed embeddings (+ grid): the model's processor checks them
            return dict(item)
        if modality == "image":
            # a torch tensor is a pre-computed embedding; everything else is an image to decode
            return item if isinstance(item, torch.Tensor) else load_image(item)
        if modality == "video":
            if isinstance(item, torch.Tensor):
                raise ValueError("a video cannot be a torch tensor; pass frames as a (T, H, W, 3) uint8 numpy "
                                 "array, or precomputed embeddings as a dict {'video_embeds', 'video_grid_thw'}")
            loader = getattr(self.processor.info, "load_video", None) if self.processor is not None else None
            return loader(item, kwargs) if loader is not None else load_video(item)
        raise ValueError(f"modality {modality!r} has no loader; fovea loads 'image' and 'video'")

    def _check_tokens(self, token_ids: list[int], params: SamplingParams, is_encoder: bool = False) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id(s) {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
        if is_encoder:  # the encoder's prompt has its own limit; max_tokens counts against the decoder's
            if len(token_ids) > self.max_model_len:
                raise ValueError(f"the prompt ({len(token_ids)} tokens, image placeholders included) is over "
                                 f"max_model_len={self.max_model_len}, the encoder's limit")
            return
        num_prompt = len(token_ids)
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - num_prompt
        if num_prompt + max_tokens > self.max_model_len:
            raise ValueError(
                f"the prompt ({num_prompt} tokens, image placeholders included) plus max_tokens={max_tokens} "
                f"is {num_prompt + max_tokens} tokens, over max_model_len={self.max_model_len}"
            )


def _as_items(modality: str, value: Any) -> list[Any]:
    """The items of one modality: a list (or tuple) is several, anything else one; except that for video a
    list of PIL images is the frames of one video (vLLM's reading)."""
    if not isinstance(value, (list, tuple)):
        return [value]
    if modality == "video" and value and all(isinstance(v, Image.Image) for v in value):
        return [list(value)]
    return list(value)


def profile_mm_features(processor: BaseMultiModalProcessor | None, max_model_len: int, max_num_batched_tokens: int,
                        max_tokens_per_item: Mapping[str, int], mm_limits: Mapping[str, int]
                        ) -> list[MultiModalFeature]:
    """The items of the worst-case step, for memory profiling: as many of the modality with the largest items
    as one step's tokens can hold. Modalities limited to 0 items per prompt are left out ([] if none is left:
    a text-only profile)."""
    if processor is None or not max_tokens_per_item:
        return []
    modality = max(max_tokens_per_item, key=max_tokens_per_item.get)
    fit = max(1, min(max_num_batched_tokens, max_model_len) // max(1, max_tokens_per_item[modality]))
    counts = {modality: min(mm_limits[modality], fit)}
    dummy = processor.dummy_inputs.get_dummy_processor_inputs(max_model_len, counts)
    hashes = {m: [f"dummy-{m}-{i}" for i in range(len(v))] for m, v in dummy.mm_data.items()}
    return processor.apply(dummy.prompt or [0], dummy.mm_data, hashes).mm_features

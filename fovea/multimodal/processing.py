"""The multimodal processing framework (seed 001): processing info, prompt updates, the processor.

A model plugs in with three classes: a `BaseProcessingInfo` (limits per prompt, tokens per item), a
`BaseDummyInputsBuilder` (worst-case inputs for memory profiling, in profiling.py) and a
`BaseMultiModalProcessor` (preprocessing, how the processed tensors split per item, and the prompt updates
that put placeholder tokens where the item's embeddings go). `apply()` turns a prompt plus media into
token ids with placeholder ranges, one `MultiModalFeature` per item.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fovea.engine.request import MultiModalFeature


@dataclass(slots=True)
class InputProcessingContext:
    """What processing needs from the model: its HF config, tokenizer and directory."""

    model_dir: str
    hf_config: Any
    tokenizer: Any
    mm_processor_kwargs: dict[str, Any] = field(default_factory=dict)


class BaseProcessingInfo(ABC):
    def __init__(self, ctx: InputProcessingContext):
        self.ctx = ctx

    def get_hf_config(self) -> Any:
        return self.ctx.hf_config

    def get_tokenizer(self) -> Any:
        return self.ctx.tokenizer

    @abstractmethod
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        """Most items of each modality per prompt (None = unlimited)."""

    @abstractmethod
    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        """Largest number of embedding tokens one item of each modality can produce."""

    def get_allowed_mm_limits(self, user_limits: Mapping[str, int] | None = None) -> dict[str, int]:
        """The model's limits, narrowed by the user's `limit_mm_per_prompt`."""
        supported = self.get_supported_mm_limits()
        limits: dict[str, int] = {}
        for modality, model_limit in supported.items():
            limit = model_limit if model_limit is not None else 1 << 30
            if user_limits and modality in user_limits:
                if user_limits[modality] > limit:
                    raise ValueError(
                        f"limit_mm_per_prompt[{modality!r}]={user_limits[modality]} exceeds the model's limit of {limit}"
                    )
                limit = user_limits[modality]
            limits[modality] = limit
        for modality in user_limits or {}:
            if modality not in supported:
                raise ValueError(
                    f"limit_mm_per_prompt names {modality!r}, which this model does not take; it takes {', '.join(supported)}"
                )
        return limits


@dataclass(slots=True)
class PromptUpdateDetails:
    """What an update puts in the prompt (`full`) and which of those tokens take embeddings (`is_embed`)."""

    full: list[int]
    is_embed: list[bool] | None = None  # None: every token of `full` is an embedding position

    @staticmethod
    def from_seq(seq: Sequence[int]) -> "PromptUpdateDetails":
        return PromptUpdateDetails(full=list(seq))

    @staticmethod
    def select_token_id(seq: Sequence[int], embed_token_id: int) -> "PromptUpdateDetails":
        """`seq` is inserted whole; only its `embed_token_id` tokens receive features."""
        return PromptUpdateDetails(full=list(seq), is_embed=[t == embed_token_id for t in seq])

    @property
    def num_embeds(self) -> int:
        return len(self.full) if self.is_embed is None else sum(self.is_embed)


@dataclass(frozen=True, slots=True)
class PromptIndex:
    """A position in the prompt: the start, the end, or right after a given prefix."""

    kind: str  # "start" | "end" | "prefix"
    prefix: tuple[int, ...] = ()

    def resolve(self, token_ids: Sequence[int]) -> int | None:
        if self.kind == "start":
            return 0
        if self.kind == "end":
            return len(token_ids)
        n = len(self.prefix)
        return n if tuple(token_ids[:n]) == self.prefix else None


class PromptIndexTargets:
    @staticmethod
    def start() -> PromptIndex:
        return PromptIndex("start")

    @staticmethod
    def end() -> PromptIndex:
        return PromptIndex("end")

    @staticmethod
    def prefix(seq: Sequence[int]) -> PromptIndex:
        return PromptIndex("prefix", tuple(seq))


UpdateContent = Callable[[int], "Sequence[int] | PromptUpdateDetails"]


def _as_details(content: Any) -> PromptUpdateDetails:
    return content if isinstance(content, PromptUpdateDetails) else PromptUpdateDetails.from_seq(content)


@dataclass(slots=True)
class PromptReplacement:
    """Replace the i-th occurrence of `target` (a token sequence) with `replacement(i)`."""

    modality: str
    target: Sequence[int]
    replacement: UpdateContent


@dataclass(slots=True)
class PromptInsertion:
    """Insert `insertion(i)` for item i at `target` (items in order, each after the previous one)."""

    modality: str
    target: PromptIndex
    insertion: UpdateContent


PromptUpdate = PromptReplacement | PromptInsertion


@dataclass(slots=True)
class PlaceholderRange:
    offset: int
    length: int
    is_embed: list[bool] | None = None


def _find(seq: list[int], target: Sequence[int], start: int) -> int:
    target = list(target)
    n = len(target)
    for i in range(start, len(seq) - n + 1):
        if seq[i] == target[0] and seq[i:i + n] == target:
            return i
    return -1


def apply_prompt_updates(
    token_ids: list[int], updates: Sequence[PromptUpdate], mm_counts: Mapping[str, int]
) -> tuple[list[int], dict[str, list[PlaceholderRange]]]:
    """Apply the updates for every item; return the new ids and each item's placeholder range.

    Insertions go in first (item i right after item i-1). Replacements then run in one left-to-right pass
    over the prompt, so items of different modalities may interleave; the i-th occurrence of a modality's
    target becomes item i. Placeholder counts must equal item counts exactly.
    """
    ids = list(token_ids)
    placeholders: dict[str, list[PlaceholderRange]] = {}

    def shift(at: int, delta: int) -> None:
        for ranges in placeholders.values():
            for r in ranges:
                if r.offset >= at:
                    r.offset += delta

    for update in updates:
        if not isinstance(update, PromptInsertion):
            continue
        at = update.target.resolve(ids)
        if at is None:
            raise ValueError(f"cannot find where to insert the {update.modality} tokens in the prompt")
        for item in range(mm_counts.get(update.modality, 0)):
            details = _as_details(update.insertion(item))
            shift(at, len(details.full))
            ids[at:at] = details.full
            placeholders.setdefault(update.modality, []).append(PlaceholderRange(at, len(details.full), details.is_embed))
            at += len(details.full)

    replacements = [u for u in updates if isinstance(u, PromptReplacement)]
    found = {u.modality: 0 for u in replacements}
    cursor = 0
    while replacements:
        hits = [(_find(ids, u.target, cursor), k) for k, u in enumerate(replacements)]
        hits = [(at, k) for at, k in hits if at >= 0]
        if not hits:
            break
        at, k = min(hits)
        update = replacements[k]
        item = found[update.modality]
        if item >= mm_counts.get(update.modality, 0):
            raise ValueError(
                f"the prompt has more {update.modality} placeholders than the "
                f"{mm_counts.get(update.modality, 0)} {update.modality} item(s) given; put one placeholder per item"
            )
        details = _as_details(update.replacement(item))
        shift(at + 1, len(details.full) - len(update.target))
        ids[at:at + len(update.target)] = details.full
        placeholders.setdefault(update.modality, []).append(PlaceholderRange(at, len(details.full), details.is_embed))
        found[update.modality] = item + 1
        cursor = at + len(details.full)
    for modality, num_found in found.items():
        if num_found != mm_counts.get(modality, 0):
            raise ValueError(
                f"the prompt has {num_found} {modality} placeholder(s) but {mm_counts.get(modality, 0)} {modality} "
                f"item(s) were given; put one placeholder per item"
            )
    return ids, placeholders


class MultiModalFieldConfig:
    """How one processed tensor splits into per-item pieces."""

    def __init__(self, modality: str, kind: str, sizes: Sequence[int] | None = None):
        self.modality = modality
        self.kind = kind  # "batched": dim 0 indexes items; "flat": dim 0 concatenates items of `sizes` rows
        self.sizes = list(sizes) if sizes is not None else None

    @staticmethod
    def batched(modality: str) -> "MultiModalFieldConfig":
        return MultiModalFieldConfig(modality, "batched")

    @staticmethod
    def flat_from_sizes(modality: str, sizes: Sequence[int]) -> "MultiModalFieldConfig":
        return MultiModalFieldConfig(modality, "flat", sizes)

    def split(self, value: torch.Tensor) -> list[torch.Tensor]:
        if self.kind == "batched":
            return [value[i:i + 1] for i in range(value.shape[0])]
        return list(torch.split(value, self.sizes, dim=0))


@dataclass(slots=True)
class MultiModalInputs:
    prompt: str | None
    prompt_token_ids: list[int]
    mm_features: list[MultiModalFeature]


def preprocess_images_or_embeds(images: list[Any], image_processor: Callable[[list[Any]], dict[str, torch.Tensor]],
                                *, model: str, embed_shape: tuple[int | None, ...], embed_dims: str
                                ) -> dict[str, torch.Tensor]:
    """`pixel_values` of decoded images, or `image_embeds` [N, *embed_shape] when the prompt's items are pre-computed
    embeddings (each `embed_shape`, or with a leading batch dimension of 1); `embed_dims` names the shape's
    dimensions in the errors (BLIP-2: "num_query_tokens, text hidden size").

    A leading None in `embed_shape` lets each item have its own number of rows (LLaVA-NeXT: one per placeholder,
    which depends on the image's size): the items are then concatenated, `image_embeds` [sum of rows, ...], and
    `num_image_tokens` [N] (int64) says how many rows each one has."""
    from PIL import Image

    from fovea.multimodal.media import ACCEPTED_IMAGE_INPUTS, type_name

    for item in images:  # the input processor has decoded every image; what is left is embeddings or wrong
        if not isinstance(item, (Image.Image, torch.Tensor)):
            given = f"a dict with keys {sorted(map(str, item))}" if isinstance(item, Mapping) else type_name(item)
            raise ValueError(f"{model} cannot take {given} as an image; pass an image ({ACCEPTED_IMAGE_INPUTS}), "
                             f"or precomputed image_embeds as a torch.Tensor of shape {list(embed_shape)} "
                             f"({embed_dims})")
    embeds = [im for im in images if isinstance(im, torch.Tensor)]
    if not embeds:
        return image_processor(images)
    if len(embeds) != len(images):
        raise ValueError("one prompt cannot mix images and pre-computed image_embeds")
    checked = []
    for e in embeds:
        if e.dim() == len(embed_shape) + 1 and e.shape[0] == 1:
            e = e[0]
        fits = e.dim() == len(embed_shape) and all(want is None or got == want
                                                     for got, want in zip(e.shape, embed_shape))
        if not fits or not e.is_floating_point() or e.shape[0] == 0:
            shown = "(" + ", ".join("any" if d is None else str(d) for d in embed_shape) + ")"
            raise ValueError(f"image_embeds has shape {tuple(e.shape)} ({e.dtype}); {model} expects floats of shape "
                             f"{shown} per image ({embed_dims}), optionally with a leading batch dimension of 1")
        checked.append(e)
    if embed_shape[0] is None:
        return {"image_embeds": torch.cat(checked), "num_image_tokens": torch.tensor([len(e) for e in checked])}
    return {"image_embeds": torch.stack(checked)}


class BaseMultiModalProcessor(ABC):
    def __init__(self, info: BaseProcessingInfo, dummy_inputs: Any = None):
        self.info = info
        self.dummy_inputs = dummy_inputs

    @abstractmethod
    def _preprocess(self, mm_items: Mapping[str, list[Any]], mm_kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Turn loaded media into the model's tensors (e.g. pixel_values for all images at once)."""

    @abstractmethod
    def _get_mm_fields_config(
        self, processed: Mapping[str, torch.Tensor], mm_kwargs: Mapping[str, Any]
    ) -> dict[str, MultiModalFieldConfig]:
        """Which modality each processed tensor belongs to, and how it splits per item."""

    @abstractmethod
    def _get_prompt_updates(
        self, mm_counts: Mapping[str, int], processed: Mapping[str, torch.Tensor], mm_kwargs: Mapping[str, Any]
    ) -> list[PromptUpdate]:
        """Where each item's placeholder tokens go, and which of them take embeddings."""

    def _tokenize(self, prompt: str) -> list[int]:
        return list(self.info.get_tokenizer()(prompt).input_ids)

    def _split_items(self, processed: Mapping[str, torch.Tensor], mm_kwargs: Mapping[str, Any]) -> dict[str, list[dict]]:
        per_item: dict[str, list[dict]] = {}
        for key, config in self._get_mm_fields_config(processed, mm_kwargs).items():
            if key not in processed:
                continue
            for i, piece in enumerate(config.split(processed[key])):
                items = per_item.setdefault(config.modality, [])
                if len(items) <= i:
                    items.append({})
                items[i][key] = piece
        return per_item

    def apply(
        self,
        prompt: str | list[int],
        mm_items: Mapping[str, list[Any]],
        mm_hashes: Mapping[str, list[str]],
        mm_kwargs: Mapping[str, Any] | None = None,
    ) -> MultiModalInputs:
        """Prompt text or ids + loaded media -> token ids with placeholders and one feature per item."""
        mm_kwargs = dict(mm_kwargs or {})
        token_ids = self._tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        mm_counts = {m: len(v) for m, v in mm_items.items() if v}
        processed = self._preprocess(mm_items, mm_kwargs) if mm_counts else {}
        per_item = self._split_items(processed, mm_kwargs)
        updates = self._get_prompt_updates(mm_counts, processed, mm_kwargs) if mm_counts else []
        token_ids, placeholders = apply_prompt_updates(token_ids, updates, mm_counts)
        features: list[MultiModalFeature] = []
        for modality, ranges in placeholders.items():
            for i, r in enumerate(ranges):
                features.append(MultiModalFeature(
                    modality=modality, offset=r.offset, length=r.length, mm_hash=mm_hashes[modality][i],
                    data=per_item[modality][i], is_embed=r.is_embed,
                ))
        features.sort(key=lambda f: f.offset)
        return MultiModalInputs(prompt=prompt if isinstance(prompt, str) else None,
                                prompt_token_ids=token_ids, mm_features=features)

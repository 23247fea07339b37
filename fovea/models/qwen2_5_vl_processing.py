"""Qwen2.5-VL's multimodal processing: images at native resolution, several per prompt, and video.

Each `<|image_pad|>` / `<|video_pad|>` in the prompt is one item and expands to its t*h*w/4 tokens (what
transformers' Qwen2_5_VLProcessor does to the text); all of them take embeddings. Pixels go through fovea's
`Qwen2VLImageProcessor` / `Qwen2VLVideoProcessor`. Per item the model gets its patch rows and its grid
(`pixel_values` + `image_grid_thw`, `pixel_values_videos` + `video_grid_thw` + `second_per_grid_ts`), or
precomputed `image_embeds` / `video_embeds` + grid, given as a dict item.

Options (`mm_processor_kwargs`, per model and per request): `min_pixels` / `max_pixels` (images and videos
alike, as transformers' processor applies them), `fps` (video files are sampled at it), `min_frames` and
`max_frames` (the fewest frames sampled from a file, the most frames a video may have).

A video's M-RoPE time step (`second_per_grid_ts`, seconds per temporal patch) is temporal_patch_size / rate,
the rate as transformers' `VideoMetadata.sampled_fps` gives it: a file's sampled rate, `LoadedVideo.fps`, or
24 for frames given without a rate (an array, a list of images).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from fovea.engine.request import MultiModalFeature
from fovea.multimodal.processors import (
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    check_fps,
    get_image_processor,
    get_video_processor,
    smart_resize,
)
from fovea.multimodal.media import ACCEPTED_IMAGE_INPUTS, LoadedVideo, load_video, type_name
from fovea.multimodal.processing import (
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    MultiModalFieldConfig,
    PromptReplacement,
    PromptUpdate,
)
from fovea.multimodal.profiling import BaseDummyInputsBuilder, ProcessorInputs

MM_OPTIONS = ("min_pixels", "max_pixels", "fps", "min_frames", "max_frames")
_MAX_ASPECT_RATIO = 200  # smart_resize refuses more


def size_with_most_tokens(factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """An input (height, width) that `smart_resize` turns into the most factor x factor tokens.

    Candidates: the best factorisation a x b <= max_pixels / factor^2 (taken as it is); and the thinnest
    allowed shapes (aspect ratio 200), whose short side smart_resize keeps at one factor while the long side
    follows the area, so for small pixel limits they exceed max_pixels (once shrunk, once grown from below
    min_pixels). Every candidate is checked with smart_resize itself.
    """
    budget = max_pixels // (factor * factor)
    candidates = []
    for a in range(1, math.isqrt(budget) + 1):
        candidates.append((a * factor, min(budget // a, _MAX_ASPECT_RATIO * a) * factor))
    candidates.append((1, _MAX_ASPECT_RATIO))  # tiny: grown to min_pixels
    side = 1
    while True:  # the smallest 1:200 input that is shrunk to max_pixels
        if round(side / factor) * round(_MAX_ASPECT_RATIO * side / factor) * factor * factor > max_pixels:
            candidates.append((side, _MAX_ASPECT_RATIO * side))
            break
        side += 1

    def tokens(size: tuple[int, int]) -> int:
        h, w = smart_resize(*size, factor, min_pixels, max_pixels)
        return (h // factor) * (w // factor)

    return max(candidates, key=tokens)


class Qwen2_5_VLProcessingInfo(BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None, "video": None}

    def get_options(self, mm_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The model's options overridden by the request's; unknown names are an error."""
        options = {**(self.ctx.mm_processor_kwargs or {}), **(mm_kwargs or {})}
        unknown = sorted(set(options) - set(MM_OPTIONS))
        if unknown:
            raise ValueError(f"unknown mm_processor_kwargs {unknown} for Qwen2.5-VL; valid: {list(MM_OPTIONS)}")
        if "fps" in options:  # checked here too: an image-only request never builds the video processor
            check_fps(options["fps"])
        return options

    @functools.cached_property
    def _image_processor(self) -> Qwen2VLImageProcessor:
        processor = get_image_processor(self.ctx.model_dir)
        if not isinstance(processor, Qwen2VLImageProcessor):
            raise ValueError(f"Qwen2.5-VL needs a Qwen2VLImageProcessor config, {self.ctx.model_dir} has "
                             f"{type(processor).__name__}")
        return processor

    @functools.cached_property
    def _video_processor(self) -> Qwen2VLVideoProcessor:
        return get_video_processor(self.ctx.model_dir)

    def get_image_processor(self, mm_kwargs: Mapping[str, Any] | None = None) -> Qwen2VLImageProcessor:
        options = self.get_options(mm_kwargs)
        return self._image_processor.with_options(**{k: options[k] for k in ("min_pixels", "max_pixels")
                                                     if k in options})

    def get_video_processor(self, mm_kwargs: Mapping[str, Any] | None = None) -> Qwen2VLVideoProcessor:
        return self._video_processor.with_options(**self.get_options(mm_kwargs))

    def load_video(self, item: Any, mm_kwargs: Mapping[str, Any] | None = None) -> LoadedVideo:
        """Decode a user's video with this model's frame sampling and frame cap (what the input processor calls)."""
        processor = self.get_video_processor(mm_kwargs)
        return load_video(item, max_frames=processor.max_frames, sample_frames=processor.sample_frame_indices)

    def get_image_token_id(self) -> int:
        return self.get_hf_config().image_token_id

    def get_video_token_id(self) -> int:
        return self.get_hf_config().video_token_id

    # ------------------------------------------------------------------ token counts

    def get_num_image_tokens(self, *, width: int, height: int, processor: Qwen2VLImageProcessor | None = None) -> int:
        processor = processor or self.get_image_processor()
        gh, gw = processor.grid_size(height, width)
        return gh * gw // processor.merge_size**2

    def get_num_video_tokens(self, *, width: int, height: int, num_frames: int,
                             processor: Qwen2VLVideoProcessor | None = None) -> int:
        processor = processor or self.get_video_processor()
        h, w = processor.resized_size(height, width, max_pixels=processor.frame_pixel_cap(num_frames))
        return processor.num_grid_t(num_frames) * (h // processor.factor) * (w // processor.factor)

    def get_image_size_with_most_features(self) -> tuple[int, int]:
        """(width, height)."""
        p = self.get_image_processor()
        height, width = size_with_most_tokens(p.factor, p.min_pixels, p.max_pixels)
        return width, height

    def get_max_image_tokens(self) -> int:
        width, height = self.get_image_size_with_most_features()
        return self.get_num_image_tokens(width=width, height=height)

    def get_video_shape_with_most_features(self, max_tokens: int) -> tuple[int, int, int]:
        """(num_frames, width, height): frames of the size with the most tokens, as many as fit in `max_tokens`
        (at least one temporal patch, at most max_frames)."""
        p = self.get_video_processor()
        height, width = size_with_most_tokens(p.factor, p.min_pixels, p.frame_pixel_cap(p.temporal_patch_size))
        per_patch = self.get_num_video_tokens(width=width, height=height, num_frames=p.temporal_patch_size)
        num_frames = min(p.max_frames, max(1, max_tokens // per_patch) * p.temporal_patch_size)
        if p.cap_pixels_per_frame:  # the per-frame cap shrinks as frames are added: size for the final count
            height, width = size_with_most_tokens(p.factor, p.min_pixels, p.frame_pixel_cap(num_frames))
        return num_frames, width, height

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        """Images: the most any image can give. Videos: the most frames allow, up to what fits in seq_len alone
        (a longer video could not be served anyway)."""
        num_frames, width, height = self.get_video_shape_with_most_features(seq_len)
        return {"image": self.get_max_image_tokens(),
                "video": self.get_num_video_tokens(width=width, height=height, num_frames=num_frames)}


class Qwen2_5_VLDummyInputsBuilder(BaseDummyInputsBuilder):
    info: Qwen2_5_VLProcessingInfo

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return ("<|vision_start|><|image_pad|><|vision_end|>" * mm_counts.get("image", 0)
                + "<|vision_start|><|video_pad|><|vision_end|>" * mm_counts.get("video", 0))

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int]) -> dict[str, list[Any]]:
        data: dict[str, list[Any]] = {}
        if "image" in mm_counts:  # the base builder passes only modalities asked for at least once
            width, height = self.info.get_image_size_with_most_features()
            data["image"] = self._get_dummy_images(width=width, height=height, num_images=mm_counts["image"])
        num_videos = mm_counts.get("video", 0)
        if num_videos:  # the videos share what the images leave of seq_len
            room = max(0, seq_len - mm_counts.get("image", 0) * self.info.get_max_image_tokens()) // num_videos
            num_frames, width, height = self.info.get_video_shape_with_most_features(room)
            rng = np.random.default_rng(0)
            frames = rng.integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)
            data["video"] = [LoadedVideo(frames) for _ in range(num_videos)]
        return data

    def get_dummy_processor_inputs(self, seq_len: int, mm_counts: Mapping[str, int]) -> ProcessorInputs:
        # "unlimited" images would be 2**30 of them: no more than can fill seq_len matter for memory
        counts = dict(mm_counts)
        if counts.get("image"):
            counts["image"] = min(counts["image"], max(1, -(-seq_len // self.info.get_max_image_tokens())))
        return super().get_dummy_processor_inputs(seq_len, counts)


class Qwen2_5_VLMultiModalProcessor(BaseMultiModalProcessor):
    info: Qwen2_5_VLProcessingInfo

    def _preprocess(self, mm_items: Mapping[str, list[Any]], mm_kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        images = mm_items.get("image", [])
        for item in images:  # the input processor has decoded every image; what is left is embeddings or wrong
            if not isinstance(item, (Image.Image, Mapping)):
                raise ValueError(f"Qwen2.5-VL cannot take {type_name(item)} as an image; pass an image "
                                 f"({ACCEPTED_IMAGE_INPUTS}), or precomputed embeddings as a dict "
                                 f"{{'image_embeds': [tokens, hidden], 'image_grid_thw': (t, h, w)}}")
        if images:
            out.update(self._embeds_or_pixels("image", images, lambda items: self._images(items, mm_kwargs)))
        videos = mm_items.get("video", [])
        if videos:
            out.update(self._embeds_or_pixels("video", videos, lambda items: self._videos(items, mm_kwargs)))
        return out

    def _embeds_or_pixels(self, modality: str, items: list[Any], process) -> dict[str, torch.Tensor]:
        embeds = [item for item in items if isinstance(item, Mapping)]
        if not embeds:
            return process(items)
        if len(embeds) != len(items):
            raise ValueError(f"one prompt cannot mix {modality}s and precomputed {modality}_embeds")
        return self._check_embeds(modality, embeds)

    def _images(self, images: list[Any], mm_kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        processor = self.info.get_image_processor(mm_kwargs)
        processed = processor(images)
        most = self.info.get_max_image_tokens()
        for num_tokens in (processed["image_grid_thw"].prod(-1) // processor.merge_size**2).tolist():
            if num_tokens > most:
                raise ValueError(f"an image of {num_tokens} tokens exceeds the {most} this engine was sized for; "
                                 f"send a smaller image, or start the engine with a larger max_pixels in its "
                                 f"mm_processor_kwargs (fovea serve --mm-processor-kwargs, LLM(mm_processor_kwargs=))")
        return processed

    def _videos(self, videos: list[Any], mm_kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        processor = self.info.get_video_processor(mm_kwargs)
        loaded = [v if isinstance(v, LoadedVideo) else self.info.load_video(v, mm_kwargs) for v in videos]
        for video in loaded:
            if len(video.frames) > processor.max_frames:
                raise ValueError(f"a video of {len(video.frames)} frames is over max_frames={processor.max_frames}")
        processed = processor([v.frames for v in loaded])
        # seconds of video per temporal patch, as Qwen2_5_VLProcessor._process_videos computes it (float64)
        seconds = [processor.temporal_patch_size / v.sampled_fps for v in loaded]
        processed["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
        return processed

    def _check_embeds(self, modality: str, items: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Dict items {"<modality>_embeds": [tokens, hidden], "<modality>_grid_thw": [3] or [1, 3]}."""
        hidden = self.info.get_hf_config().text_config.hidden_size
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        key, grid_key = f"{modality}_embeds", f"{modality}_grid_thw"
        embeds, grids = [], []
        for item in items:
            if set(item) - {key, grid_key, "second_per_grid_ts"} or key not in item or grid_key not in item:
                raise ValueError(f"a precomputed {modality} item is a dict with {key!r} and {grid_key!r}; "
                                 f"got keys {sorted(item)}")
            grid = torch.as_tensor(item[grid_key], dtype=torch.long).reshape(-1)
            tensor = torch.as_tensor(item[key])
            if grid.numel() != 3 or (grid[1:] % merge).any():
                raise ValueError(f"{grid_key} must be (t, h, w) with h, w multiples of {merge}; got {grid.tolist()}")
            rows = int(grid.prod()) // merge**2
            if tuple(tensor.shape) != (rows, hidden):
                raise ValueError(f"{key} must be [{rows}, {hidden}] for {grid_key} {grid.tolist()}, "
                                 f"got {list(tensor.shape)}")
            embeds.append(tensor)
            grids.append(grid)
        out = {key: torch.cat(embeds), grid_key: torch.stack(grids)}
        if modality == "video":
            # without it, one second per patch: what transformers' get_rope_index takes when none is given
            seconds = [float(item.get("second_per_grid_ts", 1.0)) for item in items]
            out["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
        return out

    def _get_mm_fields_config(self, processed, mm_kwargs) -> dict[str, MultiModalFieldConfig]:
        merge_unit = self.info.get_hf_config().vision_config.spatial_merge_size ** 2
        fields: dict[str, MultiModalFieldConfig] = {}
        for modality, pixels_key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
            grid = processed.get(f"{modality}_grid_thw")
            if grid is None:
                continue
            sizes = grid.prod(-1).tolist()
            fields[pixels_key] = MultiModalFieldConfig.flat_from_sizes(modality, sizes)
            fields[f"{modality}_embeds"] = MultiModalFieldConfig.flat_from_sizes(modality,
                                                                                  [s // merge_unit for s in sizes])
            fields[f"{modality}_grid_thw"] = MultiModalFieldConfig.batched(modality)
        fields["second_per_grid_ts"] = MultiModalFieldConfig.batched("video")
        return fields

    def _get_prompt_updates(self, mm_counts, processed, mm_kwargs) -> list[PromptUpdate]:
        merge_unit = self.info.get_hf_config().vision_config.spatial_merge_size ** 2
        updates: list[PromptUpdate] = []
        for modality, token_id in (("image", self.info.get_image_token_id()),
                                   ("video", self.info.get_video_token_id())):
            if not mm_counts.get(modality):
                continue
            counts = (processed[f"{modality}_grid_thw"].prod(-1) // merge_unit).tolist()
            updates.append(PromptReplacement(modality, [token_id],
                                             lambda i, token_id=token_id, counts=counts: [token_id] * counts[i]))
        return updates


# ---------------------------------------------------------------------------------------------- M-RoPE positions


def _grid_of(feature: MultiModalFeature) -> tuple[int, int, int]:
    grid = feature.data.get(f"{feature.modality}_grid_thw")
    if grid is None:
        raise ValueError(f"{feature.modality} feature at offset {feature.offset} has no {feature.modality}_grid_thw")
    t, h, w = (int(v) for v in torch.as_tensor(grid).reshape(-1).tolist())
    return t, h, w


def mrope_input_positions(
    hf_config, input_tokens: Sequence[int], mm_features: Sequence[MultiModalFeature]
) -> tuple[torch.Tensor, int]:
    """M-RoPE positions [3, len(input_tokens)] of a prompt, and the delta for every later token.

    transformers' `get_rope_index` rule: text tokens take the next index on all three rows. An item of
    t x h x w patches takes (t', h', w') over its merged t x h/2 x w/2 grid, each row offset by the index
    where the item starts; for videos t' = floor(t * tokens_per_second * second_per_grid_ts) (float32
    arithmetic, as there). Text after an item starts max(h, w) / 2 past the item's start (transformers 5.23;
    the video's temporal extent is not counted). A later token at position p >= len(input_tokens) is at
    p + delta on all rows, delta = max(position) + 1 - len(input_tokens).
    """
    vision = hf_config.vision_config
    merge, tokens_per_second = vision.spatial_merge_size, vision.tokens_per_second
    parts: list[torch.Tensor] = []
    cursor = start = 0  # next prompt token to place; next free position index
    for feature in sorted(mm_features, key=lambda f: f.offset):
        if feature.offset < cursor:
            raise ValueError(f"multimodal features overlap at token {feature.offset}")
        num_text = feature.offset - cursor
        parts.append(torch.arange(start, start + num_text).expand(3, -1))
        start += num_text
        t, h, w = _grid_of(feature)
        mh, mw = h // merge, w // merge
        if feature.length != t * mh * mw:
            raise ValueError(f"{feature.modality} placeholder at offset {feature.offset} has {feature.length} tokens "
                             f"but its grid {t}x{h}x{w} needs {t * mh * mw}")
        if feature.modality == "video":
            seconds = feature.data.get("second_per_grid_ts")
            seconds = torch.as_tensor(1.0 if seconds is None else seconds, dtype=torch.float32).reshape(())
            t_pos = (torch.arange(t) * (seconds * tokens_per_second)).long()
        else:
            t_pos = torch.arange(t)
        grid = torch.stack(torch.meshgrid(t_pos, torch.arange(mh), torch.arange(mw), indexing="ij")).view(3, -1)
        parts.append(grid + start)
        start += max(mh, mw)
        cursor = feature.offset + feature.length
    parts.append(torch.arange(start, start + len(input_tokens) - cursor).expand(3, -1))
    positions = torch.cat(parts, dim=1)
    delta = int(positions.max()) + 1 - len(input_tokens) if positions.numel() else 0
    return positions, delta

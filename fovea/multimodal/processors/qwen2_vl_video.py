"""Qwen2-VL's video processor (also Qwen2.5-VL's): frames already sampled in, patches out."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fovea.multimodal.processors.qwen2_vl_base import QwenVisionProcessor
from fovea.multimodal.processors.transforms import check_fps


class Qwen2VLVideoProcessor(QwenVisionProcessor):
    """transformers' `Qwen2VLVideoProcessor`, without torchvision.

    Per video of T RGB frames: smart resize with the video's own pixel limits, applied with
    `F.interpolate(uint8, mode="bicubic", antialias=True, align_corners=False)` (what torchvision's resize runs
    on uint8 CPU tensors); rescale and normalise fused into one float32 (x - 255 mean) / (255 std); the last
    frame repeated up to a multiple of `temporal_patch_size`; patches of (C, temporal_patch_size, P, P).

    Frame selection happens before, when a file is decoded (`fovea.multimodal.media.load_video` calls
    `sample_frame_indices`): files are sampled at `fps` (between `min_frames` and `max_frames` frames), frames
    given as arrays are taken as they are (at most `max_frames` of them).
    """

    DEFAULT_MIN_PIXELS = 128 * 28 * 28
    DEFAULT_MAX_PIXELS = 28 * 28 * 768
    DEFAULT_FPS = 2.0  # qwen-vl-utils' and vLLM's; transformers samples only when asked (do_sample_frames)
    DEFAULT_MIN_FRAMES = 4  # transformers' Qwen2VLVideoProcessor.min_frames
    extra_options = frozenset({"cap_pixels_per_frame", "max_video_tokens", "fps", "min_frames", "max_frames"})
    # transformers' switches for sampling array inputs; fovea samples files always and arrays never
    no_effect_options = QwenVisionProcessor.no_effect_options | {"do_sample_frames", "num_frames",
                                                                  "return_metadata"}
    _MODES = {Image.Resampling.BICUBIC: "bicubic", Image.Resampling.BILINEAR: "bilinear"}

    def __init__(self, *, cap_pixels_per_frame: bool | None = False, max_video_tokens: int = 128000,
                 fps: float | None = DEFAULT_FPS, min_frames: int = DEFAULT_MIN_FRAMES, max_frames: int = 768,
                 **options: Any):
        super().__init__(**options)
        if self.resample not in self._MODES:
            raise ValueError(f"video resample must be BICUBIC (3) or BILINEAR (2), got {self.resample!r}")
        self.cap_pixels_per_frame = bool(cap_pixels_per_frame)
        self.max_video_tokens = int(max_video_tokens)
        self.fps = check_fps(self.DEFAULT_FPS if fps is None else fps)
        for name, value in (("min_frames", min_frames), ("max_frames", max_frames)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.min_frames, self.max_frames = min_frames, max_frames

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "cap_pixels_per_frame": self.cap_pixels_per_frame,
                "max_video_tokens": self.max_video_tokens, "fps": self.fps, "min_frames": self.min_frames,
                "max_frames": self.max_frames}

    def sample_frame_indices(self, total_num_frames: int, video_fps: float) -> list[int]:
        """Which of a file's `total_num_frames` frames (at `video_fps`) to keep: transformers'
        `Qwen2VLVideoProcessor.sample_frames` with `fps`. The count is the video's length times `fps`, at
        least `min_frames`, at most `max_frames` and the video's own frames, rounded down to whole temporal
        patches; the frames are spread evenly from the first. A video shorter than one temporal patch keeps
        all its frames (transformers divides by zero there)."""
        tp = self.temporal_patch_size
        most = math.floor(min(self.max_frames, total_num_frames) / tp) * tp
        wanted = min(max(total_num_frames / video_fps * self.fps, self.min_frames), most, total_num_frames)
        num_frames = math.floor(wanted / tp) * tp
        if num_frames == 0:
            return list(range(total_num_frames))
        # float32 steps, as transformers' torch.arange: the rounding decides which frame a tick lands on
        return torch.arange(0, total_num_frames, total_num_frames / num_frames).int().tolist()

    def frame_pixel_cap(self, num_frames: int) -> int:
        """max_pixels for one frame of a video of `num_frames` frames (cap_pixels_per_frame shares a budget)."""
        if not self.cap_pixels_per_frame:
            return self.max_pixels
        total = int(self.max_video_tokens * self.factor * self.factor * 0.9)
        return max(min(self.max_pixels, total * self.temporal_patch_size // num_frames), int(self.min_pixels * 1.05))

    def num_grid_t(self, num_frames: int) -> int:
        return -(-num_frames // self.temporal_patch_size)

    def __call__(self, videos: list[np.ndarray | torch.Tensor]) -> dict[str, torch.Tensor]:
        """videos: (T, H, W, 3) uint8 frames each -> {"pixel_values_videos": float32 [sum t*h*w, C*T*P*P],
        "video_grid_thw": long [num_videos, 3]}."""
        if not videos:
            raise ValueError("no videos to process")
        patches, grids = [], []
        for video in videos:
            frames = torch.as_tensor(np.asarray(video)) if not isinstance(video, torch.Tensor) else video
            if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8 or frames.shape[0] < 1:
                raise ValueError(f"a video must be (T, H, W, 3) uint8 RGB frames, got {tuple(frames.shape)} "
                                 f"{frames.dtype}")
            num_frames, height, width, _ = frames.shape
            frames = frames.permute(0, 3, 1, 2).contiguous()  # (T, 3, H, W)
            h, w = self.resized_size(height, width, max_pixels=self.frame_pixel_cap(num_frames))
            if (h, w) != (height, width):
                frames = F.interpolate(frames, size=(h, w), mode=self._MODES[self.resample], antialias=True,
                                       align_corners=False)
            patches.append(self._patchify(self._normalize(frames)))
            grids.append([self.num_grid_t(num_frames), h // self.patch_size, w // self.patch_size])
        return {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids, dtype=torch.long)}

    def _normalize(self, frames: torch.Tensor) -> torch.Tensor:  # (T, 3, H, W) uint8 -> float32
        x = frames.to(torch.float32)
        mean = torch.tensor(self.image_mean, dtype=torch.float32)
        std = torch.tensor(self.image_std, dtype=torch.float32)
        if self.do_normalize:
            if self.do_rescale:  # transformers folds the rescale into mean and std
                mean, std = mean * (1.0 / self.rescale_factor), std * (1.0 / self.rescale_factor)
            return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        return x * self.rescale_factor if self.do_rescale else x

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        # x (T, C, H, W) float32 -> (t*gh*gw, C*T'*P*P)
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        if x.shape[0] % tp:
            x = torch.cat([x, x[-1:].expand(tp - x.shape[0] % tp, -1, -1, -1)])
        t, channels, height, width = x.shape
        gt, gh, gw = t // tp, height // p, width // p
        x = x.view(gt, tp, channels, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, bh, bw, mh, mw, C, tp, ph, pw)
        return x.reshape(gt * gh * gw, channels * tp * p * p)

"""Qwen2-VL's video processor (also Qwen2.5-VL's): frames already sampled in, patches out."""
from __future__ import annotations

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

    Frame selection happens before, when the video is loaded (`fovea.multimodal.media.load_video`): `fps` is
    the rate frames are sampled at from files and the rate assumed for frames given without one, `max_frames`
    the most frames a video may have.
    """

    DEFAULT_MIN_PIXELS = 128 * 28 * 28
    DEFAULT_MAX_PIXELS = 28 * 28 * 768
    DEFAULT_FPS = 2.0
    extra_options = frozenset({"cap_pixels_per_frame", "max_video_tokens", "fps", "max_frames"})
    # frame sampling options of transformers' processor; fovea samples frames in load_video instead
    no_effect_options = QwenVisionProcessor.no_effect_options | {"do_sample_frames", "min_frames", "num_frames",
                                                                  "return_metadata"}
    _MODES = {Image.Resampling.BICUBIC: "bicubic", Image.Resampling.BILINEAR: "bilinear"}

    def __init__(self, *, cap_pixels_per_frame: bool | None = False, max_video_tokens: int = 128000,
                 fps: float | None = DEFAULT_FPS, max_frames: int = 768, **options: Any):
        super().__init__(**options)
        if self.resample not in self._MODES:
            raise ValueError(f"video resample must be BICUBIC (3) or BILINEAR (2), got {self.resample!r}")
        self.cap_pixels_per_frame = bool(cap_pixels_per_frame)
        self.max_video_tokens = int(max_video_tokens)
        self.fps = check_fps(self.DEFAULT_FPS if fps is None else fps)
        self.max_frames = int(max_frames)
        if self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "cap_pixels_per_frame": self.cap_pixels_per_frame,
                "max_video_tokens": self.max_video_tokens, "fps": self.fps, "max_frames": self.max_frames}

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

"""transformers' own video rules, run without torchvision: frame sampling, decoding and the frame rate.

What Qwen2_5_VLProcessor does with a video, in transformers 5.23:
- frames given without metadata (an array, a list of images) get `make_batched_metadata`'s default (fps None,
  every frame), whose `VideoMetadata.sampled_fps` falls back to 24;
- frames with a known rate get `video_metadata={"fps": ..., "total_num_frames": ...}`: sampled_fps is that rate;
- files are decoded (here with `read_video_pyav`, the PyAV backend) keeping the frames
  `Qwen2VLVideoProcessor.sample_frames` picks for `fps`; sampled_fps is kept / total frames times the stream's rate;
- `second_per_grid_ts = temporal_patch_size / sampled_fps` (`Qwen2_5_VLProcessor._process_videos`).

`Qwen2VLVideoProcessor`'s module imports torchvision at the top, which this environment lacks, so its
`sample_frames` (plain math and torch) is compiled from the module's source on its own and called with the
processor's options. A change of the rule upstream changes what these tests expect.
"""
from __future__ import annotations

import ast
import functools
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import transformers
from transformers.video_utils import VideoMetadata, make_batched_metadata, read_video_pyav

QWEN2_VL_VIDEO_DEFAULTS = {"num_frames": None, "fps": None, "temporal_patch_size": 2, "min_frames": 4,
                           "max_frames": 768}
"""The class attributes of transformers' Qwen2VLVideoProcessor that sample_frames reads."""


@functools.cache
def _sample_frames_function():
    source = Path(transformers.__file__).parent / "models" / "qwen2_vl" / "video_processing_qwen2_vl.py"
    tree = ast.parse(source.read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    method = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "sample_frames")
    namespace = {"math": math, "torch": torch, "VideoMetadata": VideoMetadata}
    exec(compile(ast.Module(body=[method], type_ignores=[]), str(source), "exec"), namespace)
    return namespace["sample_frames"]


def hf_sample_frames(metadata: VideoMetadata, **options) -> np.ndarray:
    """transformers' `Qwen2VLVideoProcessor.sample_frames(metadata)` for a processor with `options`
    (fps, min_frames, max_frames, temporal_patch_size, num_frames)."""
    unknown = set(options) - set(QWEN2_VL_VIDEO_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}")
    processor = SimpleNamespace(**{**QWEN2_VL_VIDEO_DEFAULTS, **options})
    return np.asarray(_sample_frames_function()(processor, metadata))


def hf_read_video(path: str | Path, **options) -> tuple[np.ndarray, VideoMetadata]:
    """(frames (T, H, W, 3) uint8, metadata) as transformers decodes a file with PyAV and samples it."""
    return read_video_pyav(str(path), sample_indices_fn=lambda metadata: hf_sample_frames(metadata, **options))


def hf_frames_metadata(frames: np.ndarray, fps: float | None = None) -> VideoMetadata:
    """The metadata transformers gives frames passed as they are: its default without a rate, or the
    `video_metadata` a caller who knows the rate passes."""
    given = None if fps is None else {"total_num_frames": len(frames), "fps": fps}
    return make_batched_metadata([frames], video_metadata=given)[0]


def hf_second_per_grid_t(metadata: VideoMetadata, temporal_patch_size: int = 2) -> float:
    """Qwen2_5_VLProcessor's seconds per temporal patch for one video."""
    return temporal_patch_size / metadata.sampled_fps

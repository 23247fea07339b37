"""fovea's Qwen2-VL video preprocessing against a reference written out here from transformers'
`Qwen2VLVideoProcessor` rules (that class needs torchvision, which fovea must not)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from fovea.multimodal.processors import Qwen2VLVideoProcessor, get_video_processor


def reference_video(frames: np.ndarray, min_pixels: int, max_pixels: int, mean=(0.48145466, 0.4578275, 0.40821073),
                    std=(0.26862954, 0.26130258, 0.27577711), patch=14, merge=2, temporal=2):
    """transformers' Qwen2VLVideoProcessor, rule by rule: smart resize, torchvision's uint8 bicubic antialiased
    resize (= F.interpolate on uint8), rescale folded into normalise, trailing frame repeated, patch order."""
    num_frames, height, width, _ = frames.shape
    h, w = hf_smart_resize(height, width, patch * merge, min_pixels, max_pixels)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
    if (h, w) != (height, width):
        x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    mean_255 = torch.tensor(mean) * (1 / (1 / 255))
    std_255 = torch.tensor(std) * (1 / (1 / 255))
    x = (x.to(torch.float32) - mean_255[:, None, None]) / std_255[:, None, None]
    while x.shape[0] % temporal:
        x = torch.cat([x, x[-1:]])
    rows = []
    for t in range(0, x.shape[0], temporal):
        for block_row in range(0, h // patch, merge):
            for block_col in range(0, w // patch, merge):
                for i in range(merge):
                    for j in range(merge):
                        r, c = (block_row + i) * patch, (block_col + j) * patch
                        piece = x[t:t + temporal, :, r:r + patch, c:c + patch]  # (T, C, P, P)
                        rows.append(piece.permute(1, 0, 2, 3).reshape(-1))
    grid = [x.shape[0] // temporal, h // patch, w // patch]
    return torch.stack(rows), grid


def frames(num_frames: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)


VIDEO_LIMITS = dict(min_pixels=28 * 28 * 2, max_pixels=28 * 28 * 8)


@pytest.mark.parametrize("num_frames,width,height", [(5, 160, 120), (4, 84, 56), (1, 30, 20), (3, 20, 300),
                                                     (2, 500, 400)])
def test_video_matches_reference(num_frames, width, height):
    video = frames(num_frames, width, height)
    pixels, grid = reference_video(video, **VIDEO_LIMITS)
    ours = Qwen2VLVideoProcessor(**VIDEO_LIMITS)([video])
    assert ours["video_grid_thw"].tolist() == [grid]
    assert torch.equal(ours["pixel_values_videos"], pixels)


def test_a_batch_of_videos_is_their_concatenation():
    videos = [frames(3, 100, 80, 1), frames(2, 60, 60, 2)]
    processor = Qwen2VLVideoProcessor(**VIDEO_LIMITS)
    batch = processor(videos)
    singles = [processor([v]) for v in videos]
    assert torch.equal(batch["pixel_values_videos"], torch.cat([s["pixel_values_videos"] for s in singles]))
    assert torch.equal(batch["video_grid_thw"], torch.cat([s["video_grid_thw"] for s in singles]))


def test_video_pixel_cap_per_frame():
    """cap_pixels_per_frame shares max_video_tokens' worth of pixels over the frames (qwen-vl-utils' rule)."""
    processor = Qwen2VLVideoProcessor(min_pixels=28 * 28 * 2, max_pixels=28 * 28 * 64, cap_pixels_per_frame=True,
                                      max_video_tokens=40)
    video = frames(8, 300, 200)
    cap = max(min(28 * 28 * 64, int(40 * 28 * 28 * 0.9) * 2 // 8), int(28 * 28 * 2 * 1.05))
    pixels, grid = reference_video(video, 28 * 28 * 2, cap)
    ours = processor([video])
    assert ours["video_grid_thw"].tolist() == [grid] and torch.equal(ours["pixel_values_videos"], pixels)


def test_video_config_lookup_order(tmp_path):
    """processor_config.json's "video_processor", else video_preprocessor_config.json, else the image config."""
    image_config = {"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 1000, "max_pixels": 5000}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(image_config))
    assert get_video_processor(tmp_path).max_pixels == 5000
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "Qwen2VLVideoProcessor", "size": {"shortest_edge": 100, "longest_edge": 6000},
         "do_sample_frames": False, "fps": 1.0}))
    processor = get_video_processor(tmp_path)
    assert (processor.min_pixels, processor.max_pixels, processor.fps) == (100, 6000, 1.0)
    nested = {"video_processor": {"min_pixels": 100, "max_pixels": 7000}}
    (tmp_path / "processor_config.json").write_text(json.dumps(nested))
    assert get_video_processor(tmp_path).max_pixels == 7000

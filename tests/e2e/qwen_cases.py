"""Shared inputs for the Qwen2.5-VL engine tests, and transformers' answer for each.

A case is a prompt with its images and videos. `reference_inputs` builds what transformers' generate takes
without going through fovea's processor: images through transformers' own `Qwen2VLImageProcessorPil`, each
`<|image_pad|>` / `<|video_pad|>` expanded to its item's token count the way `Qwen2_5_VLProcessor` expands
text. Videos are decoded and sampled by transformers' own PyAV reader and Qwen2-VL frame choice, and their
`second_per_grid_ts` comes from transformers' `VideoMetadata` (tests/oracle/video.py); their pixels go through
fovea's `Qwen2VLVideoProcessor`, as transformers' needs torchvision (which this environment lacks); that
processor is checked against the written-out rules in tests/multimodal/processors.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fovea.multimodal.media import LoadedVideo
from fovea.multimodal.processors import get_video_processor
from tests.oracle.qwen2_5_vl import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, hf_image_processor, hf_model
from tests.oracle.video import hf_frames_metadata, hf_read_video, hf_second_per_grid_t

_PADS = re.compile(r"<\|image_pad\|>|<\|video_pad\|>")


def image(seed: int, width: int, height: int) -> Image.Image:
    """Smooth gradients plus noise, so resizing matters and neighbouring patches differ."""
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, width)[None, :, None] * rng.uniform(0.2, 1.0, (1, 1, 3))
    noise = rng.integers(0, 80, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def frames(seed: int, num_frames: int, width: int, height: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


@dataclass
class Case:
    name: str
    prompt: str
    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)  # arrays, LoadedVideo or file paths
    max_tokens: int = 8

    def prompt_dict(self) -> dict:
        mm = {k: v for k, v in (("image", self.images), ("video", self.videos)) if v}
        return {"prompt": self.prompt, "multi_modal_data": mm} if mm else {"prompt": self.prompt}


def cases() -> list[Case]:
    return [
        Case("image", chat(f"{IMAGE_PLACEHOLDER}What is in this image?"), [image(0, 200, 150)], max_tokens=10),
        Case("wide and tiny", chat(f"{IMAGE_PLACEHOLDER} and {IMAGE_PLACEHOLDER} Which one is bigger?"),
             [image(1, 700, 20), image(2, 12, 10)], max_tokens=7),  # 35:1, and grown to min_pixels
        Case("tall above max_pixels", chat(f"Describe it. {IMAGE_PLACEHOLDER}"), [image(3, 40, 1500)], max_tokens=6),
        Case("large", chat(f"{IMAGE_PLACEHOLDER}Describe the image in detail."), [image(4, 640, 480)], max_tokens=9),
        Case("two images", chat(f"First {IMAGE_PLACEHOLDER} then {IMAGE_PLACEHOLDER}: what changed?"),
             [image(5, 90, 60), image(6, 120, 200)], max_tokens=8),
        Case("odd-frame video", chat(f"{VIDEO_PLACEHOLDER}What are the children doing?"),
             videos=[frames(7, 5, 160, 120)], max_tokens=11),
        Case("video and image", chat(f"{VIDEO_PLACEHOLDER}{IMAGE_PLACEHOLDER}Where is the dog?"),
             [image(8, 90, 60)], [LoadedVideo(frames(9, 3, 70, 100), fps=24.0)], max_tokens=5),
        Case("text only", chat("Hello world! Write a short caption for this photo."), max_tokens=12),
    ]


def reference_inputs(model_dir: str, case: Case) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """(input_ids [L] with expanded placeholders, the tensors transformers' forward takes)."""
    merge_unit = hf_model(model_dir).config.vision_config.spatial_merge_size ** 2
    mm: dict[str, torch.Tensor | None] = {}
    counts = {"<|image_pad|>": [], "<|video_pad|>": []}
    if case.images:
        processed = hf_image_processor(model_dir)(images=case.images, return_tensors="pt")
        mm["pixel_values"], mm["image_grid_thw"] = processed["pixel_values"], processed["image_grid_thw"]
        counts["<|image_pad|>"] = (processed["image_grid_thw"].prod(-1) // merge_unit).tolist()
    if case.videos:
        processor = get_video_processor(model_dir)
        videos = [reference_video(v, processor) for v in case.videos]
        processed = processor([frames for frames, _ in videos])
        mm["pixel_values_videos"], mm["video_grid_thw"] = processed["pixel_values_videos"], processed["video_grid_thw"]
        mm["second_per_grid_ts"] = torch.tensor([hf_second_per_grid_t(metadata, processor.temporal_patch_size)
                                                 for _, metadata in videos])
        counts["<|video_pad|>"] = (processed["video_grid_thw"].prod(-1) // merge_unit).tolist()
    seen = {pad: 0 for pad in counts}

    def expand(match: re.Match) -> str:
        pad = match.group(0)
        seen[pad] += 1
        return pad * counts[pad][seen[pad] - 1]

    text = _PADS.sub(expand, case.prompt)
    assert all(seen[pad] == len(counts[pad]) for pad in counts), "one placeholder per item"
    tokenizer = hf_tokenizer(model_dir)
    return torch.tensor(tokenizer(text).input_ids), mm


def reference_video(video, processor) -> tuple[np.ndarray, object]:
    """(frames, transformers' VideoMetadata) of a case's video: a file as transformers reads and samples it at
    the model's fps, frames with their rate, or frames without one."""
    if isinstance(video, LoadedVideo):
        return video.frames, hf_frames_metadata(video.frames, video.fps)
    if isinstance(video, (list, tuple)):  # PIL frames
        video = np.stack([np.asarray(frame.convert("RGB")) for frame in video])
    if isinstance(video, np.ndarray):
        return video, hf_frames_metadata(video)
    return hf_read_video(video, fps=processor.fps, min_frames=processor.min_frames, max_frames=processor.max_frames,
                         temporal_patch_size=processor.temporal_patch_size)


def hf_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def write_video(path: Path, video: np.ndarray, fps: int) -> Path:
    """An MPEG-4 part 2 file (lossy: the test compares against frames decoded from the same file)."""
    import av

    height, width = video.shape[1:3]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    path.write_bytes(buffer.getvalue())
    return path

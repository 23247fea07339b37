"""Image and video processors: decoded media in, the vision encoder's pixel tensors out.

Each class reproduces one transformers processor bit for bit (tests/multimodal/processors checks against the
oracle) with PIL, numpy and torch only; fovea never needs torchvision. transformers without torchvision picks the
PIL backend (`BlipImageProcessorPil`), which is the one matched here: torchvision's tensor resize rounds
differently, so the two transformers backends do not agree with each other.

    transforms.py       convert_to_rgb, the rescale + normalise table, option checks (shared)
    configs.py          reading a checkpoint's processor config files
    blip.py             BlipImageProcessor (BLIP, BLIP-2, InstructBLIP)
    clip.py             CLIPImageProcessor (CLIP, LLaVA-1.5)
    fuyu.py             FuyuImageProcessor (Fuyu: resize to fit, pad, cut into patches)
    llava_next.py       LlavaNextImageProcessor (LLaVA-NeXT: CLIP's steps on the base image and anyres tiles)
    qwen2_vl_base.py    smart_resize and the options Qwen2-VL's image and video processors share
    qwen2_vl_image.py   Qwen2VLImageProcessor
    qwen2_vl_video.py   Qwen2VLVideoProcessor
"""
from __future__ import annotations

import os

from fovea.multimodal.processors.blip import BlipImageProcessor
from fovea.multimodal.processors.clip import CLIPImageProcessor
from fovea.multimodal.processors.fuyu import FuyuImageProcessor
from fovea.multimodal.processors.configs import read_image_processor_config, read_video_processor_config
from fovea.multimodal.processors.llava_next import LlavaNextImageProcessor
from fovea.multimodal.processors.qwen2_vl_base import smart_resize
from fovea.multimodal.processors.qwen2_vl_image import Qwen2VLImageProcessor
from fovea.multimodal.processors.qwen2_vl_video import Qwen2VLVideoProcessor
from fovea.multimodal.processors.transforms import check_fps, convert_to_rgb

__all__ = ["BlipImageProcessor", "CLIPImageProcessor", "FuyuImageProcessor", "LlavaNextImageProcessor",
           "Qwen2VLImageProcessor", "Qwen2VLVideoProcessor", "check_fps", "convert_to_rgb",
           "get_image_processor", "get_video_processor", "read_image_processor_config",
           "read_video_processor_config", "smart_resize"]

# image_processor_type (without transformers' "Pil"/"Fast" backend suffix) -> fovea's processor
_IMAGE_PROCESSORS: dict[str, type] = {"BlipImageProcessor": BlipImageProcessor,
                                      "CLIPImageProcessor": CLIPImageProcessor,
                                      "FuyuImageProcessor": FuyuImageProcessor,
                                      "LlavaNextImageProcessor": LlavaNextImageProcessor,
                                      "Qwen2VLImageProcessor": Qwen2VLImageProcessor}


def get_image_processor(model_dir: str | os.PathLike):
    """The fovea processor named by the checkpoint's `image_processor_type`, configured from the checkpoint."""
    config = read_image_processor_config(model_dir)
    type_name = config.get("image_processor_type")
    base_name = type_name
    for suffix in ("Pil", "Fast"):
        if isinstance(type_name, str) and type_name.endswith(suffix):
            base_name = type_name[: -len(suffix)]
    if base_name not in _IMAGE_PROCESSORS:
        raise ValueError(f"unsupported image_processor_type {type_name!r} in {os.fspath(model_dir)!r}; "
                         f"fovea supports: {sorted(_IMAGE_PROCESSORS)}")
    return _IMAGE_PROCESSORS[base_name].from_dict(config)


def get_video_processor(model_dir: str | os.PathLike) -> Qwen2VLVideoProcessor:
    """Qwen2-VL's video processor, configured from the checkpoint (see `read_video_processor_config`)."""
    config = read_video_processor_config(model_dir)
    type_name = config.get("video_processor_type", "Qwen2VLVideoProcessor")
    if type_name not in ("Qwen2VLVideoProcessor", "Qwen2_5_VLVideoProcessor"):
        raise ValueError(f"unsupported video_processor_type {type_name!r} in {os.fspath(model_dir)!r}; "
                         f"fovea supports: ['Qwen2VLVideoProcessor']")
    # a config borrowed from the image processor (see read_video_processor_config) names that one's type
    config = {k: v for k, v in config.items() if k != "image_processor_type"}
    return Qwen2VLVideoProcessor.from_dict(config)

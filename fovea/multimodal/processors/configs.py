"""Where a checkpoint keeps its image and video processor options, found the way transformers 5 finds them.

`processor_config.json` with the options nested under "image_processor" / "video_processor" (what transformers 5
writes for a multimodal processor) wins; otherwise the flat files of older checkpoints or of a processor saved
alone: `preprocessor_config.json`, `video_preprocessor_config.json`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_video_processor_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """transformers 5's order: processor_config.json's "video_processor", video_preprocessor_config.json, and
    failing both the image processor's config (the released Qwen2.5-VL checkpoints have only that one, so
    their videos use the image pixel limits)."""
    model_dir = Path(model_dir)
    processor_file = model_dir / "processor_config.json"
    if processor_file.is_file():
        processor_config = _read_json(processor_file)
        if isinstance(processor_config.get("video_processor"), dict):
            return processor_config["video_processor"]
    video_file = model_dir / "video_preprocessor_config.json"
    if video_file.is_file():
        return _read_json(video_file)
    return read_image_processor_config(model_dir)


def read_image_processor_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The image processor's options in a checkpoint directory, found the way transformers 5 finds them."""
    model_dir = Path(model_dir)
    processor_file = model_dir / "processor_config.json"
    if processor_file.is_file():
        processor_config = _read_json(processor_file)
        if isinstance(processor_config.get("image_processor"), dict):
            return processor_config["image_processor"]
    legacy_file = model_dir / "preprocessor_config.json"
    if legacy_file.is_file():
        return _read_json(legacy_file)
    raise ValueError(f"no image processor config in {os.fspath(model_dir)!r}: expected processor_config.json with "
                     f"an 'image_processor' entry, or preprocessor_config.json")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"could not read {os.fspath(path)!r}: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{os.fspath(path)!r} must hold a JSON object, got {type(config).__name__}")
    return config

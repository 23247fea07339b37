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
    found = _find_processor_config(Path(model_dir), "video_processor", "video_preprocessor_config.json")
    return found if found is not None else read_image_processor_config(model_dir)


def read_image_processor_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The image processor's options in a checkpoint directory, found the way transformers 5 finds them."""
    found = _find_processor_config(Path(model_dir), "image_processor", "preprocessor_config.json")
    if found is not None:
        return found
    raise ValueError(f"no image processor config in {os.fspath(model_dir)!r}: expected processor_config.json with "
                     f"an 'image_processor' entry, or preprocessor_config.json")


def _find_processor_config(model_dir: Path, entry: str, own_file: str) -> dict[str, Any] | None:
    """`entry` of processor_config.json (transformers 5 writes one file for every processor), else the
    processor's own file as older versions wrote it, else None."""
    processor_file = model_dir / "processor_config.json"
    if processor_file.is_file():
        processor_config = _read_json(processor_file)
        if isinstance(processor_config.get(entry), dict):
            return processor_config[entry]
    legacy_file = model_dir / own_file
    return _read_json(legacy_file) if legacy_file.is_file() else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"could not read {os.fspath(path)!r}: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{os.fspath(path)!r} must hold a JSON object, got {type(config).__name__}")
    return config

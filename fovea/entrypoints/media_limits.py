"""Decoding limits for client media, checked from the file's header before any pixel is decoded.

A 20 KiB PNG can declare a 13000 x 13000 canvas (169 Mpx: under Pillow's own bomb limit, +800 MB decoded), an
MP4 a 4K canvas or ten thousand frames; the bytes cap (`--max-media-bytes`) says nothing about either. So the
server opens each image or video header first (Pillow and PyAV read only the header and, for containers that
do not state a frame count, the packet index), refuses what is over `MediaConfig`'s limits with a 413 naming
the limit, and only then decodes. Images are decoded here (the engine gets pixels); videos go to the engine as
bytes, which decodes them at the model's sampled frames, one at a time on its own thread.
"""
from __future__ import annotations

import asyncio
import io
import warnings
from typing import Any

from PIL import Image

from fovea.entrypoints.media_config import MediaConfig
from fovea.entrypoints.media_fetch import MediaTooLargeError
from fovea.multimodal.media import load_image
from fovea.multimodal.video_decoding import VideoHeader, read_video_header


async def prepare_media_async(mm_data: dict[str, list[Any]], config: MediaConfig,
                              slots: asyncio.Semaphore) -> dict[str, list[Any]]:
    """`prepare_media` on a worker thread once one of the server's `max_concurrent_media_decodes` slots is
    free: requests beyond that wait here, holding only their encoded bytes."""
    async with slots:
        return await asyncio.to_thread(prepare_media, mm_data, config)


def prepare_media(mm_data: dict[str, list[Any]], config: MediaConfig) -> dict[str, list[Any]]:
    """mm_data with every image's bytes decoded (within the limits) and every video's header checked."""
    prepared: dict[str, list[Any]] = {}
    for modality, items in mm_data.items():
        if modality == "image":
            prepared[modality] = [decode_image(i, config) if isinstance(i, bytes) else i for i in items]
        elif modality == "video":
            prepared[modality] = [check_video(i, config) if isinstance(i, bytes) else i for i in items]
        else:
            prepared[modality] = list(items)
    return prepared


def decode_image(data: bytes, config: MediaConfig) -> Image.Image:
    try:
        with warnings.catch_warnings():  # Pillow warns above ~89 Mpx: this check is the server's answer to that
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as header:  # reads the header only
                width, height = header.size
    except Exception as err:  # Pillow raises OSError, SyntaxError, DecompressionBombError, ... on bad data
        raise ValueError(f"could not decode image bytes: {err}") from err
    if width * height > config.max_image_pixels:
        raise MediaTooLargeError(f"the image is {width} x {height} = {width * height:,} pixels, over the server's "
                                 f"limit of {config.max_image_pixels:,} (--max-image-pixels)")
    return load_image(data)


def check_video(data: bytes, config: MediaConfig) -> bytes:
    header = probe_video(data)
    width, height, num_frames = header.width, header.height, header.num_frames
    if width * height > config.max_video_frame_pixels:
        raise MediaTooLargeError(f"the video's frames are {width} x {height} = {width * height:,} pixels, over the "
                                 f"server's limit of {config.max_video_frame_pixels:,} (--max-video-frame-pixels)")
    if num_frames > config.max_video_frames:
        raise MediaTooLargeError(f"the video has {num_frames:,} frames, over the server's limit of "
                                 f"{config.max_video_frames:,} (--max-video-frames)")
    return data


def probe_video(data: bytes) -> VideoHeader:
    """The first video stream's size, frame count and rate, from the container without decoding a frame."""
    try:
        import av  # noqa: F401
    except ImportError as err:
        raise ValueError("decoding video needs PyAV (pip install av)") from err
    try:
        return read_video_header(data)
    except Exception as err:  # PyAV raises its own error types on bad data
        raise ValueError(f"could not decode video bytes: {err}") from err

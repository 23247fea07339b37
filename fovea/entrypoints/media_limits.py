"""Decoding limits for client media, checked from the file's header before any pixel is decoded.

A 20 KiB PNG can declare a 13000 x 13000 canvas (169 Mpx: under Pillow's own bomb limit, +800 MB decoded), an
MP4 a 4K canvas or ten thousand frames; the bytes cap (`--max-media-bytes`) says nothing about either. So the
server opens each image or video header first (Pillow and PyAV read only the header and, for containers that
do not state a frame count, the packet index), refuses what is over `MediaConfig`'s limits with a 413 naming
the limit, and only then decodes. Images are decoded here (the engine gets pixels); videos go to the engine as
bytes, which decodes them at the model's sampled frames, one at a time on its own thread.

The memory a video's decoded frames take (kept frames x width x height x 3) is checked here too, before the
engine decodes anything: the server asks the model's frame sampler (`FrameSampler`, the one the engine's loader
uses, with the same options) which frames it will keep of this header's frame count and rate. The check is
server-side because the limit is the server's (offline `LLM` users are trusted and get no limits) and the header
is already open here; the engine is left as it is, deciding nothing about clients.
"""
from __future__ import annotations

import asyncio
import io
import warnings
from typing import Any

from PIL import Image

from fovea.entrypoints.media_config import MediaConfig
from fovea.entrypoints.media_errors import MediaRefusedError, MediaTooLargeError
from fovea.multimodal.media import load_image
from fovea.multimodal.video_decoding import FrameSampler, VideoHeader, read_video_header, sample_video_indices


async def prepare_media_async(mm_data: dict[str, list[Any]], config: MediaConfig, slots: asyncio.Semaphore,
                              sample_frames: FrameSampler | None = None) -> dict[str, list[Any]]:
    """`prepare_media` on a worker thread once one of the server's `max_concurrent_media_decodes` slots is
    free: requests beyond that wait here, holding only their encoded bytes."""
    async with slots:
        return await asyncio.to_thread(prepare_media, mm_data, config, sample_frames)


def prepare_media(mm_data: dict[str, list[Any]], config: MediaConfig,
                  sample_frames: FrameSampler | None = None) -> dict[str, list[Any]]:
    """mm_data with every image's bytes decoded (within the limits) and every video's header checked.
    `sample_frames`: the frames the engine will keep of a video file (None: every frame, as `load_video`)."""
    prepared: dict[str, list[Any]] = {}
    for modality, items in mm_data.items():
        if modality == "image":
            prepared[modality] = [decode_image(i, config) if isinstance(i, bytes) else i for i in items]
        elif modality == "video":
            prepared[modality] = [check_video(i, config, sample_frames) if isinstance(i, bytes) else i
                                  for i in items]
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
        raise MediaRefusedError(f"could not decode image bytes: {err}", reason="undecodable") from err
    if width * height > config.max_image_pixels:
        raise MediaTooLargeError(f"the image is {width} x {height} = {width * height:,} pixels, over the server's "
                                 f"limit of {config.max_image_pixels:,} (--max-image-pixels)", reason="too_many_pixels")
    try:
        return load_image(data)
    except ValueError as err:  # a header that parses over a body that does not
        raise MediaRefusedError(str(err), reason="undecodable") from err


def check_video(data: bytes, config: MediaConfig, sample_frames: FrameSampler | None = None) -> bytes:
    header = probe_video(data)
    width, height, num_frames = header.width, header.height, header.num_frames
    if width * height > config.max_video_frame_pixels:
        raise MediaTooLargeError(f"the video's frames are {width} x {height} = {width * height:,} pixels, over the "
                                 f"server's limit of {config.max_video_frame_pixels:,} (--max-video-frame-pixels)",
                                 reason="frame_too_large")
    if num_frames > config.max_video_frames:
        raise MediaTooLargeError(f"the video has {num_frames:,} frames, over the server's limit of "
                                 f"{config.max_video_frames:,} (--max-video-frames)", reason="too_many_frames")
    try:
        num_kept = len(sample_video_indices(header, sample_frames))
    except ValueError as err:  # no frames
        raise MediaRefusedError(f"could not decode video bytes: {err}", reason="undecodable") from err
    decoded_bytes = num_kept * width * height * 3  # (T, H, W, 3) uint8 RGB
    if decoded_bytes > config.max_video_decoded_bytes:
        raise MediaTooLargeError(f"the {num_kept:,} frames kept of the video's {num_frames:,} (the model's frame "
                                 f"sampling), {width} x {height} each, would take "
                                 f"{decoded_bytes:,} bytes decoded, over the server's limit of "
                                 f"{config.max_video_decoded_bytes:,} (--max-video-decoded-bytes)",
                                 reason="decoded_bytes")
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
        raise MediaRefusedError(f"could not decode video bytes: {err}", reason="undecodable") from err

"""Small files that declare huge media: decompression bombs for the media-limit tests, built in milliseconds
(a header is patched or an all-zero body compressed), never by encoding the huge picture itself."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 13000, height: int = 13000) -> bytes:
    """A 1-bit greyscale PNG of zeros: ~20 KiB for 13000 x 13000 (169 Mpx, under Pillow's own bomb check;
    decoded, one byte per pixel)."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def jpeg_bomb(width: int = 10000, height: int = 10000) -> bytes:
    """A 16 x 16 JPEG whose frame header (SOF0) claims width x height (100 Mpx by default)."""
    buffer = io.BytesIO()
    Image.new("L", (16, 16)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)  # after marker(2), length(2), precision(1)
    return bytes(data)


def gif_frames(num_frames: int, width: int = 64, height: int = 64, canvas: tuple[int, int] | None = None) -> bytes:
    """An animated GIF of `num_frames` small frames; `canvas` (w, h) patches the logical screen it declares."""
    frames = [Image.new("P", (width, height), color=k % 256) for k in range(num_frames)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=10, optimize=False)
    data = bytearray(buffer.getvalue())
    if canvas is not None:
        struct.pack_into("<HH", data, 6, *canvas)
    return bytes(data)


def video(num_frames: int, width: int = 16, height: int = 16, container: str = "mp4") -> bytes:
    """Black frames at 24 fps: mp4 (mpeg4, frame count in the header) or webm (VP8, counted from packets)."""
    import av

    codec = {"mp4": "mpeg4", "webm": "libvpx"}[container]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=24)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((height, width, 3), np.uint8), format="rgb24")
        for _ in range(num_frames):
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()

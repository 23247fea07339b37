"""Video files are decoded by seeking to the keyframe before each sampled frame: the frames are exactly those of
a decode from the first frame (several GOPs, with and without B-frames, MP4 / Matroska / WebM), and the work done
grows with the number of sampled frames, not with the length of the video."""
from __future__ import annotations

import io

import av
import numpy as np
import pytest

from fovea.multimodal import media
from fovea.multimodal.media import load_video
from fovea.multimodal.processors import Qwen2VLVideoProcessor
from fovea.multimodal.video_decoding import decode_frames, read_video_header

GOP = 12


def encode(num_frames: int, codec: str, container: str, max_b_frames: int = 0, width: int = 48,
           height: int = 32) -> bytes:
    """Moving noise (every frame differs, so a wrong frame cannot pass for the right one) with a keyframe every
    GOP frames."""
    base = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=24)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.gop_size = GOP
        if max_b_frames:
            stream.codec_context.max_b_frames = max_b_frames
        for k in range(num_frames):
            image = np.roll(base, 3 * k, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


SEEKABLE = [("mpeg4", "mp4", 0), ("mpeg4", "mp4", 2), ("libx264", "mp4", 3), ("libx264", "matroska", 3),
            ("libvpx", "webm", 0)]


@pytest.mark.parametrize("codec, container, max_b_frames", SEEKABLE)
def test_seeking_gives_exactly_the_sequential_frames(codec, container, max_b_frames):
    data = encode(150, codec, container, max_b_frames)
    for indices in ([0], [0, 1, 2], [5, 11, 12, 13, 40, 41, 95, 149], [23, 24, 25], list(range(0, 150, 7)), [149]):
        seeking = decode_frames(data, indices)
        sequential = decode_frames(data, indices, allow_seeking=False)
        assert seeking.is_seeking and not sequential.is_seeking
        assert len(seeking.frames) == len(sequential.frames) == len(indices)
        for index, a, b in zip(indices, seeking.frames, sequential.frames):
            assert np.array_equal(a, b), f"frame {index} differs"


def test_a_container_without_exact_seeking_falls_back_to_the_sequential_decode():
    # MPEG program streams: a seek lands by byte position, on a packet that is not the keyframe asked for
    data = encode(60, "mpeg2video", "mpeg", max_b_frames=2)
    indices = [3, 30, 59]
    decoded = decode_frames(data, indices)
    assert not decoded.is_seeking and decoded.num_decoded == 60
    sequential = decode_frames(data, indices, allow_seeking=False).frames
    assert len(decoded.frames) == 3 and all(np.array_equal(a, b) for a, b in zip(decoded.frames, sequential))


def test_work_grows_with_the_sampled_frames_not_the_length():
    data = encode(1200, "libx264", "mp4", max_b_frames=3, width=32, height=32)  # 50 s, 100 GOPs
    indices = [0, 600, 1199]
    seeking = decode_frames(data, indices)
    assert seeking.num_decoded <= len(indices) * GOP  # from each one's keyframe to it
    assert decode_frames(data, indices, allow_seeking=False).num_decoded == 1200


def test_load_video_decodes_only_around_the_sampled_frames(monkeypatch):
    data = encode(1200, "mpeg4", "mp4", width=32, height=32)
    header = read_video_header(data)
    sampler = Qwen2VLVideoProcessor(fps=0.1, min_frames=2, max_frames=4).sample_frame_indices  # 4 frames of 50 s
    runs = []

    def recording_decode(data, indices, **kwargs):
        runs.append(decode_frames(data, indices, **kwargs))
        return runs[-1]

    monkeypatch.setattr(media, "decode_frames", recording_decode)
    loaded = load_video(data, sample_frames=sampler)
    indices = sampler(header.num_frames, header.fps)
    assert len(loaded.frames) == len(indices) == 4
    assert runs[0].is_seeking and runs[0].num_decoded <= len(indices) * GOP
    sequential = decode_frames(data, sorted(set(indices)), allow_seeking=False).frames
    assert all(np.array_equal(a, b) for a, b in zip(loaded.frames, sequential))


def test_no_indices_or_indices_past_the_end():
    data = encode(30, "mpeg4", "mp4")
    for allow_seeking in (True, False):
        assert decode_frames(data, [], allow_seeking=allow_seeking).frames == []
        past = decode_frames(data, [5, 30, 100], allow_seeking=allow_seeking)
        assert len(past.frames) == 1  # only frame 5 exists, as the sequential decode has always given

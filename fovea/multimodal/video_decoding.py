"""Decode the sampled frames of a video file with PyAV, seeking instead of walking the whole file.

A model keeps a few frames of a long video (Qwen2.5-VL: 2 per second, at most 768), so decoding every frame up
to the last sampled one does work proportional to the video's length. Here the packets are listed first (demuxing
reads the file but decodes nothing), which gives each frame's presentation timestamp (pts) and the keyframes;
then, for each sampled frame, the decoder seeks to the keyframe at or before it and decodes forward to it. The
work is then about (sampled frames) x (GOP length), and the frames are exactly those a sequential decode gives:
frame k of the sequential decode is the frame with the k-th smallest pts, and decoding from a keyframe is how
every decoder starts anyway.

When the packets do not allow that mapping (a packet without a pts, two frames with one pts, packets the
container marks to discard, a frame count that disagrees with the header), or the container does not land where
asked, the frames are decoded sequentially as before: slower, never different.
"""
from __future__ import annotations

import bisect
import io
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

FrameSampler = Callable[[int, float], Sequence[int]]
"""(total_num_frames, video_fps) -> the indices of the frames to keep, increasing (transformers'
`sample_indices_fn`; the model's video processor supplies it)."""


@dataclass(slots=True, frozen=True)
class VideoHeader:
    """What the container says about its first video stream, before any frame is decoded."""

    width: int
    height: int
    num_frames: int  # the header's count; for Matroska / WebM (no count) the packets counted
    fps: float | None  # the stream's average rate; None when the container does not say


@dataclass(slots=True)
class DecodedFrames:
    frames: list[np.ndarray]  # (H, W, 3) uint8 RGB each, in index order
    num_decoded: int  # frames the decoder produced to get them (the work done)
    is_seeking: bool  # False: decoded sequentially from the first frame


class _CannotSeek(Exception):
    """The container's packets or seeking do not allow an exact seek: decode sequentially instead."""


def open_video(data: bytes):
    """The PyAV container of `data` and its first video stream (ValueError: none)."""
    import av

    container = av.open(io.BytesIO(data))
    if not container.streams.video:
        container.close()
        raise ValueError("no video stream")
    return container, container.streams.video[0]


def read_video_header(data: bytes) -> VideoHeader:
    """The header of `data`'s first video stream; PyAV's errors on bad data pass through."""
    container, stream = open_video(data)
    with container:
        # the metadata transformers' PyAV reader takes: the header's frame count and average rate
        header = VideoHeader(stream.codec_context.width, stream.codec_context.height, stream.frames,
                             float(stream.average_rate) if stream.average_rate else None)
    # Matroska / WebM headers give no count: count the packets (no decoding). So for a count the file cannot
    # hold (every frame takes a non-empty packet, so at most one frame per byte): a damaged header claiming
    # 400 M frames in 1 kB would otherwise size every frame list by the claim (7 GB, found by the fuzzer)
    if not header.num_frames or header.num_frames > len(data):
        header = VideoHeader(header.width, header.height, len(_list_packets(data)), header.fps)
    return header


def sample_video_indices(header: VideoHeader, sample_frames: FrameSampler | None) -> list[int]:
    """The frames `load_video` keeps of a file with this header: the sampler's picks (sorted, once each), or
    every frame without a sampler or a known rate."""
    if header.num_frames == 0:
        raise ValueError("no frames")
    if sample_frames is None or not header.fps:
        return list(range(header.num_frames))
    return sorted(set(int(i) for i in sample_frames(header.num_frames, header.fps)))


def decode_frames(data: bytes, indices: Sequence[int], *, allow_seeking: bool = True) -> DecodedFrames:
    """The RGB frames at `indices` (increasing) of `data`'s first video stream; indices past the stream's end
    are left out (as the sequential decode leaves them)."""
    if not indices:
        return DecodedFrames([], 0, is_seeking=False)
    if allow_seeking:
        try:
            return _decode_seeking(data, indices)
        except _CannotSeek:
            pass
    return _decode_sequential(data, indices)


def _decode_sequential(data: bytes, indices: Sequence[int]) -> DecodedFrames:
    wanted, last = set(indices), indices[-1]
    kept, num_decoded = [], 0
    container, stream = open_video(data)
    with container:
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            num_decoded += 1
            if index > last:
                break
            if index in wanted:
                kept.append(frame.to_ndarray(format="rgb24"))
    return DecodedFrames(kept, num_decoded, is_seeking=False)


@dataclass(slots=True, frozen=True)
class _Packet:
    pts: int | None
    dts: int | None
    is_keyframe: bool
    is_discard: bool


def _list_packets(data: bytes) -> list[_Packet]:
    """The first video stream's packets in file order (demuxed, not decoded)."""
    container, stream = open_video(data)
    with container:
        return [_Packet(p.pts, p.dts, p.is_keyframe, p.is_discard) for p in container.demux(stream) if p.size]


def _decode_seeking(data: bytes, indices: Sequence[int]) -> DecodedFrames:
    packets = _list_packets(data)
    pts = [p.pts for p in packets]
    if any(t is None for t in pts) or any(p.is_discard for p in packets) or len(set(pts)) != len(pts):
        raise _CannotSeek
    order = sorted(pts)  # frame k of the sequential decode has pts order[k]
    keys = sorted((p.pts, p.dts) for p in packets if p.is_keyframe)
    if not keys or keys[0][0] != order[0]:
        raise _CannotSeek  # frames shown before the first keyframe (a decoder may drop them, shifting the count)
    key_pts = [k[0] for k in keys]
    container, stream = open_video(data)
    with container:
        if stream.frames and stream.frames != len(order):
            raise _CannotSeek  # the header's count, which sampling used, is not the packets'
        stream.thread_type = "AUTO"
        kept, num_decoded = [], 0
        frames: Iterator | None = None
        last_pts = None  # of the last frame decoded in the current run
        for target in (order[i] for i in indices if i < len(order)):
            at = bisect.bisect_right(key_pts, target) - 1  # >= 0: the first frame is a keyframe
            key_pts_k, key_dts_k = keys[at]
            if frames is None or last_pts is None or key_pts_k > last_pts:  # the keyframe is ahead: jump to it
                frames = _run_from(container, stream, key_pts_k, key_dts_k)
            for frame in frames:
                num_decoded += 1
                last_pts = frame.pts
                if frame.pts == target:
                    kept.append(frame.to_ndarray(format="rgb24"))
                    break
                if frame.pts is None or frame.pts > target:
                    raise _CannotSeek  # the target was never produced: not the frame order assumed
            else:
                raise _CannotSeek
    return DecodedFrames(kept, num_decoded, is_seeking=True)


def _run_from(container, stream, key_pts: int, key_dts: int | None) -> Iterator:
    """Frames decoded from the keyframe with pts `key_pts` on (or from an earlier keyframe: only more work).

    The seek asks for the keyframe's pts, as MP4 and Matroska index their keyframes; a demuxer that indexes by
    dts could land on a later keyframe from there, so that landing is retried at the dts (<= the pts), and
    refused if it is still later (frames would be skipped)."""
    for timestamp in dict.fromkeys(t for t in (key_pts, key_dts) if t is not None):
        try:
            container.seek(timestamp, stream=stream, backward=True)
        except Exception as err:  # a container that cannot seek (PyAV raises its own error types)
            raise _CannotSeek from err
        packets = container.demux(stream)
        first = next((p for p in packets if p.size), None)
        if first is not None and first.is_keyframe and first.pts is not None and first.pts <= key_pts:
            break
    else:
        raise _CannotSeek
    # the demuxer's last, empty packet flushes the decoder
    return (frame for packet in itertools.chain([first], packets) for frame in stream.decode(packet))

"""Video frames and frame rates as transformers 5.23 takes them (issue 14, item 6).

Each kind of video input against transformers' own rules (tests/oracle/video.py): the frames a file keeps
(`Qwen2VLVideoProcessor.sample_frames`, decoded by `read_video_pyav`), and the rate the M-RoPE time step comes
from (`VideoMetadata.sampled_fps`: 24 for frames without a rate, the given rate, a file's sampled rate).
"""
from __future__ import annotations

import io
import itertools

import av
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.video_utils import VideoMetadata

from fovea.multimodal.media import UNKNOWN_VIDEO_FPS, LoadedVideo, load_video
from fovea.multimodal.processors import Qwen2VLVideoProcessor
from tests.e2e.qwen_cases import write_video
from tests.models.test_qwen2_5_vl_processing import apply, make_processor
from tests.oracle.qwen2_5_vl import VIDEO_PLACEHOLDER, build_tiny_qwen2_5_vl
from tests.oracle.video import hf_frames_metadata, hf_read_video, hf_sample_frames, hf_second_per_grid_t


def clip(num_frames: int, width: int = 64, height: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)


def test_raw_frames_have_transformers_fallback_rate():
    # what transformers gives frames passed without metadata, computed by its own VideoMetadata
    assert UNKNOWN_VIDEO_FPS == hf_frames_metadata(clip(5)).sampled_fps == 24
    assert load_video(clip(5)).sampled_fps == UNKNOWN_VIDEO_FPS
    assert load_video(LoadedVideo(clip(5), 30.0)).sampled_fps == hf_frames_metadata(clip(5), 30.0).sampled_fps


@pytest.mark.parametrize("total, video_fps, fps, min_frames, max_frames, tp", [
    (250, 25.0, 2.0, 4, 768, 2),    # 10 s at 2 fps: 20 frames
    (25, 10.0, 2.0, 4, 768, 2),     # 2.5 s: 5 frames, rounded down to 4
    (7, 30.0, 2.0, 4, 768, 2),      # 0.23 s: min_frames 4
    (5, 30.0, 2.0, 8, 768, 2),      # min_frames over the video's 5: all of them, rounded down to 4
    (40, 10.0, 2.0, 4, 3, 2),       # max_frames 3 -> 2
    (25, 10.0, 30.0, 4, 768, 2),    # above the video's own rate: its 25 frames, rounded down to 24
    (1000, 29.97, 1.0, 4, 768, 2),
    (300, 24.0, 0.5, 1, 768, 1),
    (91, 23.976, 3.0, 4, 16, 3),
])
def test_file_frame_choice_is_transformers(total, video_fps, fps, min_frames, max_frames, tp):
    processor = Qwen2VLVideoProcessor(fps=fps, min_frames=min_frames, max_frames=max_frames, temporal_patch_size=tp)
    expected = hf_sample_frames(VideoMetadata(total_num_frames=total, fps=video_fps), fps=fps, min_frames=min_frames,
                                max_frames=max_frames, temporal_patch_size=tp)
    assert processor.sample_frame_indices(total, video_fps) == expected.tolist()


def test_frame_choice_over_many_lengths_is_transformers():
    processor = Qwen2VLVideoProcessor(fps=2.0)
    for total, video_fps in itertools.product(range(2, 400, 7), (10.0, 24.0, 25.0, 29.97, 60.0)):
        expected = hf_sample_frames(VideoMetadata(total_num_frames=total, fps=video_fps), fps=2.0)
        assert processor.sample_frame_indices(total, video_fps) == expected.tolist(), (total, video_fps)


def test_video_shorter_than_a_temporal_patch_keeps_its_frame():
    # transformers divides by zero here (0 frames after rounding down); fovea keeps what there is
    assert Qwen2VLVideoProcessor(fps=2.0).sample_frame_indices(1, 30.0) == [0]


@pytest.mark.parametrize("num_frames, video_fps, options", [
    (25, 10, {"fps": 2.0}),
    (25, 10, {"fps": 30.0}),
    (12, 10, {"fps": 1.0}),                      # short: min_frames
    (40, 10, {"fps": 2.0, "max_frames": 3}),
    (30, 24, {"fps": 2.0, "min_frames": 2}),
])
def test_decoded_file_is_transformers(tmp_path, num_frames, video_fps, options):
    """Frames and rate of a real MPEG-4 file equal transformers' PyAV reader with its Qwen2-VL sampling."""
    path = write_video(tmp_path / "clip.mp4", clip(num_frames), fps=video_fps)
    expected_frames, metadata = hf_read_video(path, **options)
    processor = Qwen2VLVideoProcessor(**options)
    loaded = load_video(path, max_frames=processor.max_frames, sample_frames=processor.sample_frame_indices)
    assert np.array_equal(loaded.frames, expected_frames)
    assert loaded.fps == metadata.sampled_fps  # to the bit: the same float operations
    assert loaded.frames.shape[0] == len(metadata.frames_indices)


def test_file_without_a_frame_count_is_counted(tmp_path):
    """Matroska headers carry no frame count (transformers' PyAV reader gets 0 and fails): fovea counts the
    packets, then applies the same rule."""
    buffer = io.BytesIO()
    video = np.stack([np.full((48, 64, 3), 6 * k, np.uint8) for k in range(25)])  # frame k is grey 6k
    with av.open(buffer, mode="w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv444p"
        for frame in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(io.BytesIO(buffer.getvalue())) as container:
        assert container.streams.video[0].frames == 0
    processor = Qwen2VLVideoProcessor(fps=2.0)
    loaded = load_video(buffer.getvalue(), sample_frames=processor.sample_frame_indices)
    metadata = VideoMetadata(total_num_frames=25, fps=10.0)
    metadata.frames_indices = hf_sample_frames(metadata, fps=2.0)
    assert [int(round(f.mean() / 6)) for f in loaded.frames] == metadata.frames_indices.tolist() == [0, 6, 12, 18]
    assert loaded.fps == metadata.sampled_fps == 1.6


def test_file_without_a_sampler_keeps_every_frame_at_its_rate(tmp_path):
    path = write_video(tmp_path / "clip.mp4", clip(6), fps=5)
    loaded = load_video(path)
    assert loaded.frames.shape[0] == 6 and loaded.fps == 5.0
    with pytest.raises(ValueError, match="more than max_frames=4"):
        load_video(path, max_frames=4)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen_rate")))


def test_second_per_grid_ts_of_each_input_kind_is_transformers(ckpt, tmp_path):
    """An array, a list of images, frames with a rate, and a file sampled at the default and at a requested
    fps: `second_per_grid_ts` equals Qwen2_5_VLProcessor's, from transformers' metadata."""
    processor = make_processor(ckpt)
    frames = clip(5)
    path = write_video(tmp_path / "clip.mp4", clip(30, seed=1), fps=12)
    tp = processor.info.get_video_processor().temporal_patch_size
    cases = [
        (frames, hf_frames_metadata(frames), {}),
        (frames, hf_frames_metadata(frames), {"fps": 4.0}),  # fps samples files; raw frames stay at 24
        ([Image.fromarray(f) for f in frames], hf_frames_metadata(frames), {}),
        (LoadedVideo(frames, 30.0), hf_frames_metadata(frames, 30.0), {}),
        (str(path), hf_read_video(path, fps=2.0)[1], {}),  # the model's default rate: 2 fps
        (str(path), hf_read_video(path, fps=5.0)[1], {"fps": 5.0}),
    ]
    for video, metadata, options in cases:
        out = apply(processor, f"{VIDEO_PLACEHOLDER}what happens?", videos=[video], **options)
        expected = torch.tensor([hf_second_per_grid_t(metadata, tp)])  # float32, as BatchFeature makes it
        assert torch.equal(out.mm_features[0].data["second_per_grid_ts"], expected), (type(video), options)
    # the unknown rate is transformers' 24, not the sampling rate fovea's files default to
    assert hf_second_per_grid_t(hf_frames_metadata(frames), tp) == pytest.approx(2 / 24)

"""load_video: frames as arrays or image lists, and files decoded with PyAV and sampled at a target rate."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from fovea.multimodal.media import LoadedVideo, load_video
from fovea.multimodal.processors import Qwen2VLVideoProcessor


def frames(num_frames: int, width: int = 32, height: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)


def encode_video(num_frames: int, fps: int, width: int = 64, height: int = 48) -> bytes:
    """A lossless (ffv1) video whose frame k is flat grey 6k, so a sampled frame tells its index."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv444p"
        for k in range(num_frames):
            image = np.full((height, width, 3), 6 * k, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def frame_indices(video: LoadedVideo) -> list[int]:
    return [int(round(f.mean() / 6)) for f in video.frames]


def test_arrays_are_taken_as_they_are():
    video = frames(5)
    loaded = load_video(video)
    assert loaded.fps is None and np.array_equal(loaded.frames, video)
    assert loaded.frames is not video  # a copy: the caller's buffer may change
    floats = load_video(video / 255.0)
    assert np.array_equal(floats.frames, video)


def test_grey_rgba_and_image_lists_become_rgb_like_images():
    video = frames(3)
    grey = load_video(video[..., 0])
    assert grey.frames.shape == (3, 24, 32, 3) and np.array_equal(grey.frames[..., 1], video[..., 0])
    rgba = np.concatenate([video, np.zeros_like(video[..., :1])], axis=-1)  # fully transparent: white
    assert (load_video(rgba).frames == 255).all()
    images = [Image.fromarray(f) for f in video]
    assert np.array_equal(load_video(images).frames, video)
    assert np.array_equal(load_video([images[0].convert("P"), images[1], images[2]]).frames[0],
                          np.asarray(images[0].convert("P").convert("RGB")))


def test_frame_cap_for_given_frames_is_an_error():
    with pytest.raises(ValueError, match="max_frames=4"):
        load_video(frames(5), max_frames=4)
    assert load_video(LoadedVideo(frames(4), 8.0), max_frames=4).fps == 8.0


def test_file_sampled_by_the_models_rule(tmp_path):
    """(That the rule is transformers' is checked in tests/multimodal/test_video_sampling.py.)"""
    path = tmp_path / "clip.mkv"
    path.write_bytes(encode_video(25, fps=10))  # 2.5 s: 5 frames at 2 fps, 4 in whole temporal patches
    loaded = load_video(path, sample_frames=Qwen2VLVideoProcessor(fps=2.0).sample_frame_indices)
    assert frame_indices(loaded) == [0, 6, 12, 18]
    assert loaded.fps == pytest.approx(1.6) and loaded.frames.shape == (4, 48, 64, 3)
    every = load_video(str(path))  # no sampler: every frame, at the file's rate
    assert frame_indices(every) == list(range(25)) and every.fps == 10.0


def test_data_url_and_bad_inputs(tmp_path):
    data = encode_video(6, fps=2)
    url = "data:video/x-matroska;base64," + base64.b64encode(data).decode()
    assert frame_indices(load_video(url)) == list(range(6))
    with pytest.raises(ValueError, match="could not decode video bytes"):
        load_video(b"not a video")
    with pytest.raises(ValueError, match="media type 'image/png'"):
        load_video("data:image/png;base64,AAAA")
    with pytest.raises(ValueError, match="no such file"):
        load_video(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match="shape"):
        load_video(np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="looks like one image"):
        load_video(np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="differ in size"):
        load_video([Image.new("RGB", (4, 4)), Image.new("RGB", (5, 4))])
    with pytest.raises(ValueError, match="unsupported video input"):
        load_video(3.5)


@pytest.mark.parametrize("fps", ["x", "2", 0, -1.0, float("nan"), float("inf"), True])
def test_fps_must_be_a_positive_number(fps):
    with pytest.raises(ValueError, match="fps must be a positive number"):
        Qwen2VLVideoProcessor(fps=fps)


@pytest.mark.parametrize("name, value", [("min_frames", 0), ("max_frames", 0), ("min_frames", 2.5),
                                         ("max_frames", "8"), ("min_frames", True)])
def test_frame_counts_must_be_positive_ints(name, value):
    with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
        Qwen2VLVideoProcessor(**{name: value})


def test_a_header_claiming_more_frames_than_the_file_can_hold_is_not_believed():
    """A 927-byte MP4 the fuzzer damaged (tests/multimodal/test_media_properties.py) whose header claims
    402,653,186 frames: sizing the frame list by the claim took 7 GB and 7 s; the packets say 2."""
    import resource

    from fovea.multimodal.video_decoding import read_video_header

    data = (Path(__file__).parent / "damaged_header_400m_frames.mp4").read_bytes()
    before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    header = read_video_header(data)
    assert (header.width, header.height, header.num_frames) == (16, 32, 2)
    video = load_video(data)
    assert video.frames.shape == (2, 32, 16, 3)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kb < 200_000  # kB

"""How much seeking saves when a model keeps few frames of a long video: `load_video` with Qwen2.5-VL's sampler on
one synthetic clip, decoded by seeking (fovea's path) and from the first frame (the fallback), one after the other.

    python -m benchmarks.video_seeking --seconds 120 --gop 48 --max-frames 16

The clip is libx264 at 640 x 360, 24 fps, with B-frames and a keyframe every --gop frames (streaming services use
1-2 s; x264's default is 250), scrolling blocks of colour so every frame differs. Prints frames decoded and seconds for
both paths (best of --repeats, after a warm-up), and checks that the frames are equal.
"""
from __future__ import annotations

import argparse
import io
import time

import av
import numpy as np

from fovea.multimodal.processors import Qwen2VLVideoProcessor
from fovea.multimodal.video_decoding import decode_frames, read_video_header, sample_video_indices


def make_clip(seconds: int, gop: int, width: int = 640, height: int = 360, fps: int = 24) -> bytes:
    # 20 x 20-pixel blocks of random colour, scrolling: every frame differs, and the file stays a realistic size
    blocks = np.random.default_rng(0).integers(0, 256, (height // 20, width // 20, 3), dtype=np.uint8)
    base = np.kron(blocks, np.ones((20, 20, 1), dtype=np.uint8))
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt, stream.gop_size = width, height, "yuv420p", gop
        stream.codec_context.max_b_frames = 3
        stream.options = {"preset": "ultrafast", "bframes": "3", "keyint_min": str(gop), "sc_threshold": "0"}
        for k in range(seconds * fps):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 4 * k, axis=1), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=120)
    parser.add_argument("--gop", type=int, default=48)
    parser.add_argument("--max-frames", type=int, default=16, help="Qwen2.5-VL's max_frames (768 by default)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data = make_clip(args.seconds, args.gop)
    header = read_video_header(data)
    sampler = Qwen2VLVideoProcessor(max_frames=args.max_frames).sample_frame_indices
    indices = sample_video_indices(header, sampler)
    print(f"clip: {header.num_frames} frames {header.width} x {header.height}, {len(data):,} bytes; "
          f"keeping {len(indices)} frames (gop {args.gop})")
    decode_frames(data, indices[:1])  # warm-up: PyAV's first container and decoder set-up
    results = {}
    for name, allow_seeking in (("seeking", True), ("from the first frame", False)):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            results[name] = decode_frames(data, indices, allow_seeking=allow_seeking)
            times.append(time.perf_counter() - start)
        print(f"{name:>22}: {results[name].num_decoded:5d} frames decoded, best of {args.repeats} "
              f"{min(times):6.3f} s")
    same = all(np.array_equal(a, b) for a, b in zip(*(r.frames for r in results.values())))
    print(f"frames equal: {same}")


if __name__ == "__main__":
    main()

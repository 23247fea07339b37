"""Decoding limits: bombs served by a loopback HTTP server are refused from their headers, quickly, with the
decoding process's peak memory (RSS) barely moving; within the limits media decodes as before; at most
`max_concurrent_media_decodes` decodes run at once; lying and dripping servers are cut off."""
from __future__ import annotations

import asyncio
import http.server
import json
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image

from fovea.entrypoints import media_limits
from fovea.entrypoints.media_config import MediaConfig
from fovea.entrypoints.media_errors import MediaRefusedError
from fovea.entrypoints.media_fetch import MediaFetcher, MediaTooLargeError
from fovea.entrypoints.media_limits import prepare_media, prepare_media_async
from fovea.multimodal.processors import Qwen2VLVideoProcessor
from tests.entrypoints import ROOT, loopback_http_server, png_bytes, random_image
from tests.entrypoints import media_bombs as bombs

MAX_RSS_GROWTH_KIB = 48 * 1024  # what refusing a bomb may add to the peak RSS (decoding one adds 100-170 MB)
MAX_SECONDS = 3.0  # per bomb, fetch + header check, on a busy shared machine (each takes ~10-100 ms alone)

FILES = {
    "/png-bomb": ("image", bombs.png_bomb()),  # 13000 x 13000 = 169 Mpx in ~20 KiB
    "/jpeg-bomb": ("image", bombs.jpeg_bomb()),  # 10000 x 10000 in 335 bytes
    "/gif-bomb": ("image", bombs.gif_frames(300, canvas=(10000, 10000))),
    "/mp4-many-frames": ("video", bombs.video(20_000)),  # 14 min at 24 fps of 16 x 16 frames, ~260 KB
    "/webm-many-frames": ("video", bombs.video(15_000, container="webm")),
    "/mp4-huge-canvas": ("video", bombs.video(1, 4096, 2176)),  # over 4K
}
GOOD = {"/gif-many-frames": ("image", bombs.gif_frames(2000)), "/png": ("image", png_bytes(random_image(0, 64, 48))),
        "/mp4": ("video", bombs.video(48, 32, 32))}


@pytest.fixture(scope="module")
def media_server():
    body_of = {path: data for path, (_, data) in {**FILES, **GOOD}.items()}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/short-body":  # says 100 kB, sends 10 bytes and hangs up
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                self.wfile.write(b"0123456789")
                self.wfile.flush()
                self.close_connection = True
                return
            if self.path == "/drip":  # says 1 kB, then one byte every 50 ms: over the whole-fetch timeout
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                for _ in range(1000):
                    self.wfile.write(b"d")
                    self.wfile.flush()
                    time.sleep(0.05)
                return
            body = body_of.get(self.path, b"")
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with loopback_http_server(Handler) as base_url:
        yield base_url


# Runs in a fresh process with the server's default limits (loopback allowed so the test server can be reached).
# Before each item the kernel's peak-RSS mark (VmHWM) is reset to the current RSS (/proc/self/clear_refs "5"), so
# the peak read after it is what that fetch + check + decode added, whatever ran before.
_PROBE = """
import json, sys, time
from fovea.entrypoints.media_config import MediaConfig
from fovea.entrypoints.media_fetch import MediaFetcher
from fovea.entrypoints.media_limits import prepare_media

def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

config = MediaConfig(allow_private_media_urls=True)
fetch = MediaFetcher(config)
for line in sys.stdin:
    modality, url = json.loads(line)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before, start = status_kib("VmRSS"), time.monotonic()
    try:
        prepared = prepare_media({modality: [fetch(url)]}, config)
        error = None
    except ValueError as err:
        error = [type(err).__name__, str(err)]
    print(json.dumps({"url": url, "error": error, "seconds": time.monotonic() - start,
                      "rss_growth_kib": status_kib("VmHWM") - before}), flush=True)
    prepared = None
"""


def test_bombs_are_refused_quickly_within_a_memory_bound(media_server):
    # a warm-up decode first, so the imports PyAV and Pillow make on first use are not counted against a bomb
    jobs = [("video", media_server + "/mp4"), ("image", media_server + "/png")]
    jobs += [(modality, media_server + path) for path, (modality, _) in FILES.items()]
    jobs += [(modality, media_server + path) for path, (modality, _) in GOOD.items()]
    stdin = "".join(json.dumps(job) + "\n" for job in jobs)
    done = subprocess.run([sys.executable, "-c", _PROBE], input=stdin, capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["url"].rsplit("/", 1)[1]: r for r in map(json.loads, done.stdout.splitlines())}
    expected = {"png-bomb": "--max-image-pixels", "jpeg-bomb": "--max-image-pixels", "gif-bomb": "--max-image-pixels",
                "mp4-many-frames": "--max-video-frames", "webm-many-frames": "--max-video-frames",
                "mp4-huge-canvas": "--max-video-frame-pixels"}
    for name, flag in expected.items():
        result = results[name]
        assert result["error"] is not None and result["error"][0] == "MediaTooLargeError", result
        assert flag in result["error"][1], result
        assert result["seconds"] < MAX_SECONDS, result
        assert result["rss_growth_kib"] < MAX_RSS_GROWTH_KIB, result
    for name in ("gif-many-frames", "png", "mp4"):  # within the limits: decoded (a GIF: its first frame only)
        assert results[name]["error"] is None, results[name]
        assert results[name]["rss_growth_kib"] < MAX_RSS_GROWTH_KIB, results[name]


def test_limits_name_the_numbers_and_within_them_media_decodes():
    config = MediaConfig(max_image_pixels=64 * 48, max_video_frame_pixels=32 * 32, max_video_frames=48)
    image = random_image(0, 64, 48)
    decoded = prepare_media({"image": [png_bytes(image)]}, config)["image"][0]
    assert isinstance(decoded, Image.Image) and decoded.tobytes() == image.tobytes()
    with pytest.raises(MediaTooLargeError, match=r"65 x 48 = 3,120 pixels, over the server's limit of 3,072"):
        prepare_media({"image": [png_bytes(random_image(0, 65, 48))]}, config)
    clip = bombs.video(48, 32, 32)
    assert prepare_media({"video": [clip]}, config)["video"][0] is clip  # the engine decodes it, sampled
    with pytest.raises(MediaTooLargeError, match="49 frames, over the server's limit of 48"):
        prepare_media({"video": [bombs.video(49, 32, 32)]}, config)
    with pytest.raises(MediaTooLargeError, match="32 x 48 = 1,536 pixels"):
        prepare_media({"video": [bombs.video(2, 32, 48)]}, config)
    with pytest.raises(ValueError, match="could not decode image bytes"):
        prepare_media({"image": [b"not an image"]}, config)
    with pytest.raises(ValueError, match="could not decode video bytes"):
        prepare_media({"video": [b"not a video"]}, config)
    data_url = "data:image/png;base64,AAAA"  # strings and arrays pass through: the engine's loaders take them
    assert prepare_media({"image": [data_url]}, config) == {"image": [data_url]}


def test_at_most_max_concurrent_decodes(monkeypatch):
    running, most = 0, 0
    lock = threading.Lock()

    def slow_decode(data, config):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.1)
        with lock:
            running -= 1
        return data

    monkeypatch.setattr(media_limits, "decode_image", slow_decode)
    config = MediaConfig(max_concurrent_media_decodes=2)

    async def burst():
        slots = asyncio.Semaphore(config.max_concurrent_media_decodes)
        return await asyncio.gather(*(prepare_media_async({"image": [bytes([i])]}, config, slots)
                                      for i in range(6)))

    results = asyncio.run(burst())
    assert [r["image"][0] for r in results] == [bytes([i]) for i in range(6)]
    assert most == 2


def test_lying_and_dripping_servers_are_cut_off(media_server):
    fetch = MediaFetcher(MediaConfig(allow_private_media_urls=True, media_fetch_timeout_s=1.0))
    start = time.monotonic()
    with pytest.raises(ValueError, match="could not fetch"):
        fetch(media_server + "/short-body")  # the body ended before its Content-Length
    with pytest.raises(ValueError, match="timed out after 1.0 s"):
        fetch(media_server + "/drip")
    assert time.monotonic() - start < 3.0


def test_decoded_bytes_of_the_kept_frames_are_capped_before_decoding():
    """A 1080p clip of 30 frames at 24 fps: all of them take 186,624,000 bytes decoded; Qwen's sampling at 2 fps
    keeps 4 (24,883,200). The check uses the frames the model keeps, from the header alone."""
    clip = bombs.video(30, 1920, 1080)
    config = MediaConfig(max_video_decoded_bytes=100_000_000)
    at_2_fps = Qwen2VLVideoProcessor(fps=2.0).sample_frame_indices
    assert prepare_media({"video": [clip]}, config, at_2_fps)["video"][0] is clip
    every_frame = Qwen2VLVideoProcessor(fps=24.0).sample_frame_indices
    for sampler in (every_frame, None):  # None: load_video keeps every frame
        with pytest.raises(MediaTooLargeError, match=r"the 30 frames kept of the video's 30 .* 1920 x 1080 each, "
                                                     r"would take 186,624,000 bytes decoded, over the server's limit "
                                                     r"of 100,000,000 \(--max-video-decoded-bytes\)") as info:
            prepare_media({"video": [clip]}, config, sampler)
        assert info.value.reason == "decoded_bytes"
    assert prepare_media({"video": [clip]}, MediaConfig(), None)["video"][0] is clip  # the default: 2 GiB
    with pytest.raises(ValueError, match="max_video_decoded_bytes must be >= 1"):
        MediaConfig(max_video_decoded_bytes=0)


def test_every_refusal_names_its_reason():
    config = MediaConfig(max_image_pixels=64 * 48, max_video_frame_pixels=32 * 32, max_video_frames=48)
    cases = [({"image": [png_bytes(random_image(0, 65, 48))]}, "too_many_pixels"),
             ({"video": [bombs.video(49, 32, 32)]}, "too_many_frames"),
             ({"video": [bombs.video(2, 32, 48)]}, "frame_too_large"),
             ({"image": [b"not an image"]}, "undecodable"), ({"video": [b"not a video"]}, "undecodable")]
    for mm_data, reason in cases:
        with pytest.raises(MediaRefusedError) as info:
            prepare_media(mm_data, config)
        assert info.value.reason == reason, mm_data

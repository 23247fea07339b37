"""`fovea serve` refusing client media: each refusal counts under its reason in /metrics
(`fovea_media_refused_total{reason="..."}`), and a video is refused for the memory its SAMPLED frames would take
decoded (--max-video-decoded-bytes, with the model's own frame sampling), before the engine decodes it."""
from __future__ import annotations

import base64
import re

import httpx
import pytest

from fovea.entrypoints.media_errors import REASONS
from tests.entrypoints import ServerProcess
from tests.entrypoints import restore_torch_threads  # noqa: F401 (an autouse fixture)
from tests.entrypoints.media_bombs import png_bomb, video
from tests.oracle.qwen2_5_vl import build_tiny_qwen2_5_vl

# Tiny Qwen2.5-VL samples files at 2 fps, at least 4 frames. 64 x 48 frames take 9,216 bytes decoded.
MAX_DECODED = 100_000
SHORT = video(48, 64, 48)  # 2 s: 4 frames kept (36,864 bytes; all 48 would be 442,368)
LONG = video(240, 64, 48)  # 10 s: 20 frames kept (184,320 bytes)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen_media"), seed=0)
    proc = ServerProcess(model, "--max-model-len", "1024", "--num-kv-blocks", "256",
                         "--max-video-decoded-bytes", str(MAX_DECODED),
                         log_dir=tmp_path_factory.mktemp("qwen_media_log"))
    yield proc
    proc.stop()


def chat(server: ServerProcess, part: dict) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "Hi"}]}], "max_tokens": 1,
            "temperature": 0.0}
    return httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=120.0)


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def clip(data: bytes) -> dict:
    return {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(data).decode()}}


def refusals(server: ServerProcess) -> dict[str, float]:
    text = httpx.get(server.base_url + "/metrics", timeout=10.0).text
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^fovea_media_refused_total\{reason="([a-z_]+)"\} (\S+)$', text, re.M)}


def test_refusals_are_counted_by_reason(server):
    assert refusals(server) == {reason: 0.0 for reason in REASONS}  # every series from the start
    for url in ("http://127.0.0.1:9/a.png", "http://169.254.169.254/latest/meta-data/"):
        response = chat(server, image(url))
        assert response.status_code == 400 and "not a public address" in response.text, response.text
    response = chat(server, image("data:image/png;base64," + base64.b64encode(png_bomb()).decode()))
    assert response.status_code == 413 and "--max-image-pixels" in response.text
    response = chat(server, image("data:image/png;base64,QUJDRA=="))
    assert response.status_code == 400 and "could not decode image" in response.text
    assert chat(server, image("http://[::1]:9/a.png")).status_code == 400
    response = chat(server, {"type": "text", "text": 5})  # not media: not counted
    assert response.status_code == 400
    expected = {reason: 0.0 for reason in REASONS}
    expected.update(private_address=3.0, too_many_pixels=1.0, undecodable=1.0)
    assert refusals(server) == expected


def test_decoded_bytes_of_the_sampled_frames_are_capped(server):
    before = refusals(server)["decoded_bytes"]
    response = chat(server, clip(LONG))
    assert response.status_code == 413, response.text
    message = response.json()["error"]["message"]
    assert "20 frames kept of the video's 240" in message and "184,320 bytes" in message
    assert "100,000 (--max-video-decoded-bytes)" in message
    assert refusals(server)["decoded_bytes"] == before + 1
    # all 48 frames would be over the limit too: it passes because the model keeps 4 of them
    response = chat(server, clip(SHORT))
    assert response.status_code == 200, response.text

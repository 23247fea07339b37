"""SIGTERM: the server stops accepting connections at once, finishes the requests it is running, then exits."""
from __future__ import annotations

import json
import signal
import time

import httpx

from tests.entrypoints import ServerProcess
from tests.oracle.blip2 import build_tiny_blip2

NUM_TOKENS = 1500  # several seconds of decoding: still running when the signal arrives


def test_sigterm_finishes_running_requests_then_exits(tmp_path):
    model_dir = build_tiny_blip2(tmp_path / "blip", seed=0, max_position_embeddings=2048)
    server = ServerProcess(model_dir, "--num-kv-blocks", "256", log_dir=tmp_path)
    try:
        body = {"prompt": "a photo of", "max_tokens": NUM_TOKENS, "ignore_eos": True, "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=120) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            refused = False
            try:
                httpx.get(server.base_url + "/health", timeout=2)
            except httpx.ConnectError:
                refused = True
            assert refused, "the server still accepts connections after SIGTERM"
            events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert finish == ["length"]
        assert chunks[-1]["usage"]["completion_tokens"] == NUM_TOKENS
        assert server.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it is done
    finally:
        server.stop()

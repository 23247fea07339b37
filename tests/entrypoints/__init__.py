"""Helpers for the server tests: the real `fovea serve` in a subprocess on a free loopback port.

Every wait is bounded; a server that does not come up fails the test with the end of its log.
"""
from __future__ import annotations

import base64
import contextlib
import http.server
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0
# The machine is shared: one torch thread per server avoids spinning against other processes' threads.
COMMON_FLAGS = ["--dtype", "float32", "--num-threads", "1", "--log-level", "warning"]


@pytest.fixture(scope="module", autouse=True)
def restore_torch_threads():
    """In-process engines here run with num_threads=1 (torch's setting is global): give other modules theirs back.
    Import it into a test module to use it."""
    num_threads = torch.get_num_threads()
    yield
    torch.set_num_threads(num_threads)


class QuietHTTPServer(http.server.ThreadingHTTPServer):
    """A loopback test server whose handlers log nothing and whose clients may hang up mid-body (the point of
    the drip and cap tests) without a traceback."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        pass


@contextlib.contextmanager
def loopback_http_server(handler: type[http.server.BaseHTTPRequestHandler]):
    """Serve `handler` on 127.0.0.1 from a daemon thread; yields the base URL, shuts down on exit."""
    handler.log_message = lambda self, *args: None
    server = QuietHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, model: str | Path, *flags: str, log_dir: Path, module: str = "fovea.entrypoints.cli",
                 port: int | None = None, start_timeout_s: float | None = START_TIMEOUT_S):
        """`module`: what `python -m` runs (another entry point that ends in fovea's CLI, e.g. one that first
        registers a test model: tests/e2e/faulty_model.py). `port`: a free loopback port unless given.
        `start_timeout_s`: how long to wait for /health; None returns at once (call `wait_healthy` later)."""
        self.port = free_port() if port is None else port
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", module, "serve", str(model), "--port", str(self.port),
               *COMMON_FLAGS, *flags]
        self._log = open(self.log_path, "w")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        if start_timeout_s is not None:
            self.wait_healthy(start_timeout_s)

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until /health answers 200; a server that exits first, or is not healthy in time (then it is stopped),
        raises with the end of its log."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server was not healthy after {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, num_chars: int = 4000) -> str:
        """The end of the server's log; also after `stop` (the child wrote to the file itself: nothing of ours
        is buffered, so a closed handle is no reason to fail)."""
        return self.log_path.read_text(errors="replace")[-num_chars:]

    def metrics(self) -> dict[str, float]:
        """`fovea:*`, `fovea_*` and `process_*` samples of /metrics by name (labels dropped: one model per
        server; see `request_errors` for the one labelled family)."""
        text = httpx.get(self.base_url + "/metrics", timeout=10.0).text
        out = {}
        for line in text.splitlines():
            match = re.match(r"^((?:fovea[:_]|process_)[a-z_]+)(?:\{[^}]*\})? (\S+)$", line)
            if match and "_bucket" not in match.group(1):
                out[match.group(1)] = float(match.group(2))
        return out

    def request_errors(self) -> dict[int, float]:
        """`fovea_request_errors_total` by status code."""
        text = httpx.get(self.base_url + "/metrics", timeout=10.0).text
        return {int(m.group(1)): float(m.group(2))
                for m in re.finditer(r'^fovea_request_errors_total\{[^}]*status="(\d+)"[^}]*\} (\S+)$', text, re.M)}

    def wait_idle(self, timeout_s: float = 30.0) -> dict[str, float]:
        """Poll /metrics until nothing runs or waits and every KV block is free; return the last reading."""
        deadline = time.monotonic() + timeout_s
        while True:
            m = self.metrics()
            idle = (m["fovea:num_requests_running"] == 0 and m["fovea:num_requests_waiting"] == 0
                    and m["fovea:kv_cache_blocks_used"] == 0)
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.1)

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout_s)
        self._log.close()
        return self.proc.returncode


def random_image(seed: int, width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()

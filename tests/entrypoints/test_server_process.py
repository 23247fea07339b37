"""The server tests' helper when the server cannot come up: the error carries the end of the server's log, whether
the server exits (its port is taken) or stays up where the helper cannot reach it (the start timeout)."""
from __future__ import annotations

import socket
import time

import pytest

from tests.entrypoints import ServerProcess
from tests.oracle.blip2 import build_tiny_blip2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_blip2(tmp_path_factory.mktemp("blip"), seed=0)


def test_port_taken_error_carries_the_log(model_dir, tmp_path):
    with socket.socket() as holder:  # no SO_REUSEADDR: uvicorn's bind fails with EADDRINUSE
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(RuntimeError) as excinfo:
            ServerProcess(model_dir, "--num-kv-blocks", "64", log_dir=tmp_path, port=port)
    message = str(excinfo.value)
    assert message.startswith("the server exited with ")  # uvicorn: 3, a startup failure
    assert f"error while attempting to bind on address ('127.0.0.1', {port}): address already in use" in message


def test_start_timeout_error_carries_the_log(model_dir, tmp_path):
    # A whole server on another loopback address (127.0.0.2): up, but never healthy where the helper asks
    # (127.0.0.1), so the helper's start timeout is what ends it.
    server = ServerProcess(model_dir, "--num-kv-blocks", "64", "--host", "127.0.0.2", "--log-level", "info",
                           log_dir=tmp_path, start_timeout_s=None)
    try:
        deadline = time.monotonic() + 120
        while "Uvicorn running on" not in server.log_tail(100_000):
            assert server.proc.poll() is None and time.monotonic() < deadline, server.log_tail()
            time.sleep(0.2)
        with pytest.raises(RuntimeError) as excinfo:
            server.wait_healthy(timeout_s=1.0)
    finally:
        server.stop()
    message = str(excinfo.value)
    assert message.startswith("the server was not healthy after 1.0 s:")
    assert f"Uvicorn running on http://127.0.0.2:{server.port}" in message
    assert server.proc.poll() is not None  # stopped before raising

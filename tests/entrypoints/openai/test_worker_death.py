"""A worker process of a multi-process engine killed (SIGKILL) while requests run: the in-flight requests get a
503 (or an error event in their stream), new ones a 503 or no connection, and `fovea serve` exits non-zero
within a bound, leaving no process behind. Real server, real client, real worker processes."""
from __future__ import annotations

import concurrent.futures
import json
import signal
import time

import httpx
import psutil

from tests.entrypoints import ServerProcess
from tests.oracle.qwen2_5_vl import build_tiny_qwen2_5_vl

EXIT_BOUND_S = 30.0
LONG = {"prompt": "describe the picture", "max_tokens": 1500, "ignore_eos": True, "temperature": 0.0}


def _plain(base_url: str) -> httpx.Response:
    return httpx.post(base_url + "/v1/completions", json=LONG, timeout=EXIT_BOUND_S)


def _streamed(base_url: str, started: concurrent.futures.Future) -> list[str]:
    with httpx.stream("POST", base_url + "/v1/completions", json={**LONG, "stream": True},
                      timeout=EXIT_BOUND_S) as response:
        assert response.status_code == 200
        events = []
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
                if not started.done():
                    started.set_result(True)
    return events


def test_sigkilled_worker_gives_503_and_the_server_exits_nonzero(tmp_path):
    model_dir = build_tiny_qwen2_5_vl(tmp_path / "qwen", seed=0)
    server = ServerProcess(model_dir, "--max-model-len", "2048", "--num-kv-blocks", "1200",
                           "--distributed-executor-backend", "mp", log_dir=tmp_path)
    try:
        process = psutil.Process(server.proc.pid)
        workers = [p for p in process.children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 1, [p.cmdline() for p in process.children(recursive=True)]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            started = concurrent.futures.Future()
            streamed = pool.submit(_streamed, server.base_url, started)
            plain = pool.submit(_plain, server.base_url)
            started.result(timeout=60)
            deadline = time.monotonic() + 60
            while server.metrics()["fovea:num_requests_running"] < 2:
                assert time.monotonic() < deadline, "the two requests never ran together"
                time.sleep(0.05)
            children = process.children(recursive=True)
            workers[0].send_signal(signal.SIGKILL)
            killed = time.monotonic()
            response = plain.result(timeout=EXIT_BOUND_S)
            events = streamed.result(timeout=EXIT_BOUND_S)
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["code"] == "engine_unavailable"
        assert f"worker rank 0 (pid {workers[0].pid}) died with exit code -9 (SIGKILL)" in error["message"]
        assert events[-1] == "[DONE]" and "error" in json.loads(events[-2]), events[-3:]
        try:  # a new request: refused with a 503 while the server winds down, or no connection once it is gone
            status = httpx.post(server.base_url + "/v1/completions", json=LONG, timeout=10).status_code
            assert status == 503
        except httpx.TransportError:
            pass
        returncode = server.proc.wait(EXIT_BOUND_S)
        assert returncode != 0
        assert time.monotonic() - killed < EXIT_BOUND_S
        assert "the engine died: worker rank 0" in server.log_tail()
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"left behind: {alive}"
    finally:
        server.stop()


def test_sigterm_stops_the_server_and_its_workers(tmp_path):
    model_dir = build_tiny_qwen2_5_vl(tmp_path / "qwen", seed=0)
    server = ServerProcess(model_dir, "--max-model-len", "256", "--pipeline-parallel-size", "2", log_dir=tmp_path)
    try:
        process = psutil.Process(server.proc.pid)
        children = process.children(recursive=True)
        assert len([p for p in children if "spawn_main" in " ".join(p.cmdline())]) == 2
        response = httpx.post(server.base_url + "/v1/completions", timeout=60,
                              json={"prompt": "describe the picture", "max_tokens": 5, "temperature": 0.0})
        assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] == "length"
        assert server.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its graceful shutdown
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"left behind: {alive}"
    finally:
        server.stop()

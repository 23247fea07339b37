"""SIGTERM during a storm of requests: every request the server had taken either completes or ends with an error
(an error event in its stream, or an error status), those sent after the signal are refused, nothing hangs, and
the process exits within a bound without leaving a child process behind."""
from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import psutil

from tests.entrypoints import ServerProcess
from tests.oracle.qwen2_5_vl import build_tiny_qwen2_5_vl

SHUTDOWN_TIMEOUT_S = 3.0
EXIT_BOUND_S = 30.0
NUM_REQUESTS = 48


def body(i: int) -> dict:
    # a third short enough to finish in the grace period, the rest far too long for it
    return {"prompt": f"describe picture number {i}", "max_tokens": 4 if i % 3 == 0 else 1500, "ignore_eos": True,
            "temperature": 0.0, "stream": i % 2 == 0}


async def send(client: httpx.AsyncClient, i: int) -> str:
    """The outcome: completed, error_event, error_<status>, or refused (no connection)."""
    try:
        if not body(i)["stream"]:
            response = await client.post("/v1/completions", json=body(i))
            if response.status_code != 200:
                assert "message" in response.json()["error"]
                return f"error_{response.status_code}"
            assert response.json()["choices"][0]["finish_reason"] == "length"
            return "completed"
        async with client.stream("POST", "/v1/completions", json=body(i)) as response:
            if response.status_code != 200:
                return f"error_{response.status_code}"
            events = [line[len("data: "):] async for line in response.aiter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", events[-3:]
        last = json.loads(events[-2])
        if "error" in last:
            return "error_event"
        assert last["choices"][0]["finish_reason"] == "length"
        return "completed"
    except httpx.ConnectError:
        return "refused"


def test_sigterm_during_a_storm_answers_or_errors_every_request_and_exits_cleanly(tmp_path):
    model_dir = build_tiny_qwen2_5_vl(tmp_path / "qwen", seed=0)
    server = ServerProcess(model_dir, "--max-model-len", "2048", "--num-kv-blocks", "1200",
                           "--shutdown-timeout-s", str(SHUTDOWN_TIMEOUT_S), log_dir=tmp_path)
    try:
        process = psutil.Process(server.proc.pid)

        async def storm() -> tuple[list[str], float]:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=EXIT_BOUND_S,
                                         limits=httpx.Limits(max_connections=NUM_REQUESTS)) as client:
                first = [asyncio.ensure_future(send(client, i)) for i in range(NUM_REQUESTS // 2)]
                deadline = time.monotonic() + 60
                while server.metrics()["fovea:num_requests_running"] < NUM_REQUESTS // 4:
                    assert time.monotonic() < deadline, "the storm never got going"
                    await asyncio.sleep(0.05)
                server.proc.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                await asyncio.sleep(0.5)
                later = [asyncio.ensure_future(send(client, i)) for i in range(NUM_REQUESTS // 2, NUM_REQUESTS)]
                outcomes = await asyncio.wait_for(asyncio.gather(*first, *later), EXIT_BOUND_S)
            return outcomes, signalled

        children = process.children(recursive=True)
        outcomes, signalled = asyncio.run(storm())
        returncode = server.proc.wait(EXIT_BOUND_S)
        exit_s = time.monotonic() - signalled
    finally:
        server.stop()
    first, later = outcomes[:NUM_REQUESTS // 2], outcomes[NUM_REQUESTS // 2:]
    counts = {k: outcomes.count(k) for k in set(outcomes)}
    assert set(first) <= {"completed", "error_event", "error_503"}, counts
    assert "completed" in first and ({"error_event", "error_503"} & set(first)), counts
    assert set(later) == {"refused"}, counts
    assert returncode in (0, -signal.SIGTERM)
    assert exit_s < SHUTDOWN_TIMEOUT_S + 10, exit_s
    assert not [c for c in children if c.is_running()], "child processes outlived the server"
    assert not psutil.pid_exists(server.proc.pid) or psutil.Process(server.proc.pid).status() == psutil.STATUS_ZOMBIE

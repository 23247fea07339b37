"""What a client's constraint may cost, through `fovea serve --structured-outputs-limits` (a server client is
untrusted): a pathological schema is a quick 400 naming the limit, a grammar that reaches a per-step limit while
generating is a 400 naming it, a deeply nested grammar (which kills a process compiling it on a normal stack)
runs, and the requests sent beside them finish normally."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.engine.test_structured_outputs_limits import AMBIGUOUS, chain, huge_enum
from tests.entrypoints import ServerProcess
from tests.entrypoints import restore_torch_threads  # noqa: F401 (an autouse fixture)
from tests.oracle.qwen2_5_vl import build_tiny_qwen2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = build_tiny_qwen2(tmp_path_factory.mktemp("structured_limits_server"), seed=0)
    proc = ServerProcess(ckpt, "--max-num-seqs", "8", "--num-kv-blocks", "512",
                         "--structured-outputs-limits", json.dumps({"step_max_items": 400}),
                         log_dir=tmp_path_factory.mktemp("structured_limits_server_log"))
    yield proc
    proc.stop()


def completion(prompt: str, **extra) -> dict:
    return {"prompt": prompt, "max_tokens": 40, "temperature": 0.0, **extra}


def test_pathological_constraints_are_400s_and_the_others_finish(server):
    bodies = {
        "free": completion("free", ignore_eos=True),
        "enum": completion("e", structured_outputs={"json": huge_enum(100_000)}),
        "nested": completion("n", structured_outputs={"json": json.loads(
            '{"type":"object","properties":{"a":' * 300 + '{"type":"integer"}' + "}}" * 300)}),
        "choice": completion("c", structured_outputs={"choice": ["left", "right"]}),
        "ambiguous": completion("a", temperature=1.0, seed=3, max_tokens=200,
                                structured_outputs={"grammar": AMBIGUOUS}),
        "deep": completion("d", max_tokens=8, structured_outputs={"grammar": chain(3_000)}),
        "free2": completion("free two", ignore_eos=True),
    }

    async def send(client, body):
        t0 = time.perf_counter()
        reply = await client.post("/v1/completions", json=body)
        return reply, time.perf_counter() - t0

    async def run():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            return dict(zip(bodies, await asyncio.gather(*(send(client, b) for b in bodies.values()))))

    replies = asyncio.run(run())
    enum, seconds = replies["enum"]
    assert enum.status_code == 400, enum.text
    assert "structured_outputs.json is too large" in enum.text and "max_bytes=65536" in enum.text
    assert seconds < 10.0, seconds  # the body is 2 MB; no grammar work is done
    nested = replies["nested"][0]
    assert nested.status_code == 400 and "recursion limit" in nested.text, nested.text
    ambiguous = replies["ambiguous"][0]
    assert ambiguous.status_code == 400, ambiguous.text
    assert "exceeds the limit step_max_items=400" in ambiguous.text, ambiguous.text
    assert ambiguous.json()["error"]["param"] == "structured_outputs"
    deep = replies["deep"][0]
    assert deep.status_code == 200, deep.text
    assert set(deep.json()["choices"][0]["text"]) <= {"a", "c", "z"}
    assert replies["choice"][0].json()["choices"][0]["text"] in ("left", "right")
    for name in ("free", "free2"):
        reply = replies[name][0]
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 40, reply.text
    # the server is still up and serving
    assert httpx.get(server.base_url + "/health", timeout=30).status_code == 200


def test_a_streamed_request_reaching_a_limit_ends_with_an_error_event(server):
    body = completion("a", temperature=1.0, seed=3, max_tokens=200, stream=True,
                      structured_outputs={"grammar": AMBIGUOUS})
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=120) as reply:
        events = [line[len("data: "):] for line in reply.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "exceeds the limit step_max_items=400" in error["message"], error

"""Load: 200 concurrent streaming chat requests from one client process, with mixed image sizes, prompt
lengths and output lengths. Every request completes, every stream is well-formed SSE in OpenAI's chunk shape,
`usage` counts what was streamed, and afterwards nothing runs and every KV block is free."""
from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from tests.entrypoints import ServerProcess, data_url, random_image
from tests.oracle.qwen2_5_vl import build_tiny_qwen2_5_vl

NUM_REQUESTS = 200
IMAGE_SIZES = [(28, 28), (56, 112), (120, 90), (200, 150), (300, 40)]
WORDS = "what is in this picture describe the colours and shapes you see please in one short sentence".split()
REQUEST_TIMEOUT_S = 240.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    qwen_dir = build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen_load"), seed=0)
    # far fewer KV blocks than 128 running requests would use: the load usually includes preemptions
    proc = ServerProcess(qwen_dir, "--max-model-len", "256", "--num-kv-blocks", "120",
                         log_dir=tmp_path_factory.mktemp("qwen_load_log"))
    yield proc
    proc.stop()


def make_request(i: int, images: list[str]) -> dict:
    rng = random.Random(i)
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
    content = [{"type": "image_url", "image_url": {"url": images[i % len(images)]}}] if i % 7 else []
    return {
        "messages": [{"role": "user", "content": content + [{"type": "text", "text": text}]}],
        "max_tokens": rng.randint(1, 24), "ignore_eos": i % 2 == 0, "temperature": rng.choice([0.0, 0.8]),
        "seed": i, "logprobs": True, "stream": True, "stream_options": {"include_usage": True},
    }


async def stream_one(client: httpx.AsyncClient, body: dict) -> dict:
    """Send one streaming request; parse and check the SSE framing; return what was streamed."""
    events = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        buffer = ""
        async for piece in response.aiter_text():
            buffer += piece
            while "\n\n" in buffer:
                event, buffer = buffer.split("\n\n", 1)
                assert event.startswith("data: "), event
                events.append(event[len("data: "):])
        assert buffer == "", buffer
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    body_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert usage_chunk["choices"] == [] and all(c["usage"] is None for c in body_chunks)
    finish = [c["choices"][0]["finish_reason"] for c in body_chunks if c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and body_chunks[-1]["choices"][0]["finish_reason"] == finish[0]
    tokens = [t for c in body_chunks if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["content"]]
    return {"text": "".join(c["choices"][0]["delta"]["content"] or "" for c in body_chunks),
            "num_tokens": len(tokens), "finish_reason": finish[0], "usage": usage_chunk["usage"]}


async def run_load(base_url: str, bodies: list[dict]) -> list[dict]:
    limits = httpx.Limits(max_connections=NUM_REQUESTS, max_keepalive_connections=NUM_REQUESTS)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=REQUEST_TIMEOUT_S) as client:
        return await asyncio.wait_for(asyncio.gather(*(stream_one(client, b) for b in bodies)),
                                      REQUEST_TIMEOUT_S + 30)


def test_200_concurrent_streams_complete_well_formed_and_leave_nothing_behind(server):
    images = [data_url(random_image(s, w, h)) for s, (w, h) in enumerate(IMAGE_SIZES)]
    bodies = [make_request(i, images) for i in range(NUM_REQUESTS)]
    results = asyncio.run(run_load(server.base_url, bodies))

    assert len(results) == NUM_REQUESTS
    for body, result in zip(bodies, results):
        usage = result["usage"]
        assert usage["completion_tokens"] == result["num_tokens"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert usage["prompt_tokens"] > 0
        if body["ignore_eos"]:
            assert result["finish_reason"] == "length" and result["num_tokens"] == body["max_tokens"]
        else:
            assert result["finish_reason"] in ("stop", "length") and 1 <= result["num_tokens"] <= body["max_tokens"]
    metrics = server.wait_idle()
    assert metrics["fovea:num_requests_running"] == 0
    assert metrics["fovea:num_requests_waiting"] == 0
    assert metrics["fovea:kv_cache_blocks_used"] == 0
    assert metrics["fovea:generation_tokens_total"] == sum(r["num_tokens"] for r in results)
    assert metrics["fovea:request_success_total"] == NUM_REQUESTS
    # five images shared by ~170 requests running together: some find their image's output already there
    assert 0 < metrics["fovea:encoder_cache_hits_total"] < metrics["fovea:encoder_cache_queries_total"]

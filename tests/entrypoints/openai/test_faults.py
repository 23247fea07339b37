"""Faults against one real `fovea serve` (a tiny Qwen2.5-VL built to raise on one token id, with a KV pool small
enough to preempt constantly), driven over HTTP: greedy answers under constant preemption equal the offline
engine's with room to spare; a request that makes the model raise gets a 500 (or an error event in its stream)
while every other request in its batches is answered exactly; bursts of clients that hang up mid-stream are
aborted and counted; every non-2xx response is counted by status. After each: nothing runs, waits or is
suspected, every KV block is free, the encoder cache holds nothing."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from fovea import LLM, SamplingParams
from tests.e2e import faulty_model
from tests.entrypoints import ServerProcess, data_url, random_image
from tests.entrypoints import restore_torch_threads  # noqa: F401 (an autouse fixture)
from tests.oracle.qwen2_5_vl import build_tiny_qwen2_5_vl

MAX_MODEL_LEN = 256
NUM_KV_BLOCKS = 40  # 39 usable blocks of 16 tokens: ~5 of these requests at once, 16 are sent
IMAGES = [data_url(random_image(i, w, h)) for i, (w, h) in enumerate([(56, 56), (120, 90), (90, 140)])]
WORDS = "what is in this picture describe the colours and shapes you see please in one short sentence".split()
TIMEOUT_S = 240.0


def healthy_requests() -> list[tuple[str, dict]]:
    """(path, body): chats with an image or none, completions from text and from token ids; greedy, 8-40 tokens."""
    out = []
    for i in range(16):
        text = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(3 + 2 * i))
        params = {"temperature": 0.0, "max_tokens": 8 + 2 * i, "ignore_eos": True}
        if i % 3 == 2:
            out.append(("/v1/completions", {"prompt": text, **params}))
        else:
            content = [{"type": "image_url", "image_url": {"url": IMAGES[i % 3]}}] if i % 3 == 0 else []
            out.append(("/v1/chat/completions",
                        {"messages": [{"role": "user", "content": content + [{"type": "text", "text": text}]}],
                         **params}))
    return out


def reply_text(path: str, body: dict) -> str:
    return body["choices"][0]["message"]["content"] if path.endswith("chat/completions") else body["choices"][0]["text"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The offline engine's answers (roomy KV pool), then the faulty server on a trigger none of them contains."""
    model_dir = build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen_faults"), seed=0)
    llm = LLM(str(model_dir), dtype="float32", max_model_len=MAX_MODEL_LEN, num_threads=1)
    expected, used = [], set()
    for path, body in healthy_requests():
        params = SamplingParams(temperature=0.0, max_tokens=body["max_tokens"], ignore_eos=True)
        if "messages" in body:
            output = llm.chat(body["messages"], params, use_tqdm=False)[0]
        else:
            output = llm.generate(body["prompt"], params, use_tqdm=False)[0]
        expected.append(output.outputs[0].text)
        used |= set(output.prompt_token_ids) | set(output.outputs[0].token_ids)
    fault_token_id = next(t for t in range(1, llm.llm_engine.tokenizer.vocab_size) if t not in used)
    del llm
    faulty_model.make_faulty(model_dir, fault_token_id)
    server = ServerProcess(model_dir, "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", str(NUM_KV_BLOCKS),
                           log_dir=tmp_path_factory.mktemp("faults_log"), module="tests.e2e.faulty_model")
    yield server, expected, fault_token_id
    server.stop()


def assert_idle(server: ServerProcess) -> dict[str, float]:
    m = server.wait_idle()
    assert m["fovea:num_requests_running"] == 0 and m["fovea:num_requests_waiting"] == 0, m
    assert m["fovea:kv_cache_blocks_used"] == 0 and m["fovea:encoder_cache_tokens_used"] == 0, m
    assert m["fovea:num_requests_suspect"] == 0, m
    assert httpx.get(server.base_url + "/health").status_code == 200
    return m


async def post_all(server: ServerProcess, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=TIMEOUT_S) as client:
        return await asyncio.gather(*(client.post(path, json=body) for path, body in requests))


def test_constant_preemption_changes_no_greedy_answer(setup):
    server, expected, _ = setup
    before = server.metrics()["fovea:num_preemptions_total"]
    responses = asyncio.run(post_all(server, healthy_requests()))
    assert [r.status_code for r in responses] == [200] * len(responses)
    assert [reply_text(path, r.json()) for (path, _), r in zip(healthy_requests(), responses)] == expected
    after = assert_idle(server)
    assert after["fovea:num_preemptions_total"] > before, "the KV pool was meant to be too small"


async def stream_events(client: httpx.AsyncClient, path: str, body: dict) -> tuple[int, list[str]]:
    async with client.stream("POST", path, json={**body, "stream": True}) as response:
        text = (await response.aread()).decode()
    return response.status_code, [e[len("data: "):] for e in text.split("\n\n") if e.startswith("data: ")]


def test_a_request_that_raises_in_the_model_gets_an_error_and_its_batch_is_answered(setup):
    server, expected, fault_token_id = setup
    errors_before = server.request_errors().get(500, 0)
    failed_before = server.metrics()["fovea:failed_steps_total"]
    culprit = {"prompt": [5, 6, 7] * 10 + [fault_token_id, 8, 9], "max_tokens": 8, "temperature": 0.0}

    async def run():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=TIMEOUT_S) as client:
            healthy = [client.post(path, json=body) for path, body in healthy_requests()]
            return await asyncio.gather(client.post("/v1/completions", json=culprit),
                                        stream_events(client, "/v1/completions", culprit), *healthy)

    refused, (stream_status, events), *responses = asyncio.run(run())
    assert refused.status_code == 500
    error = refused.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "model_error" and "injected fault" in error["message"]
    assert stream_status == 200 and events[-1] == "[DONE]"  # the stream had begun: the error is its last event
    assert "injected fault" in json.loads(events[-2])["error"]["message"]
    assert [r.status_code for r in responses] == [200] * len(responses)
    assert [reply_text(path, r.json()) for (path, _), r in zip(healthy_requests(), responses)] == expected

    after = assert_idle(server)
    assert after["fovea:failed_steps_total"] > failed_before
    assert server.request_errors().get(500, 0) == errors_before + 1  # the streamed one is a 200


def test_bursts_of_clients_hanging_up_mid_stream_are_aborted_and_counted(setup):
    server, expected, _ = setup
    num_bursts, burst = 3, 12
    aborted_before = server.metrics()["fovea_requests_aborted_total"]
    body = {"prompt": "describe the colours", "max_tokens": 200, "ignore_eos": True, "stream": True}

    async def hang_up(client: httpx.AsyncClient) -> None:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    return  # closes the connection mid-stream

    async def run():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=TIMEOUT_S,
                                     limits=httpx.Limits(max_connections=64)) as client:
            for _ in range(num_bursts):
                await asyncio.gather(*(hang_up(client) for _ in range(burst)))
        # and clients that give up on a non-streamed answer: they hang up once the engine holds all 16 sequences
        # (4 requests x n=4), long before any can finish (a client timeout instead raced a quiet machine's speed)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=TIMEOUT_S) as client:
            posts = [asyncio.create_task(client.post("/v1/completions", json={**body, "stream": False, "n": 4}))
                     for _ in range(4)]
            while not any(p.done() for p in posts):
                m = await asyncio.to_thread(server.metrics)
                if m["fovea:num_requests_running"] + m["fovea:num_requests_waiting"] >= 16:
                    break
                await asyncio.sleep(0.01)
            for p in posts:
                p.cancel()
            results = await asyncio.gather(*posts, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results), results

    asyncio.run(run())
    assert_idle(server)
    assert server.metrics()["fovea_requests_aborted_total"] == aborted_before + num_bursts * burst + 4
    # and the server answers as before
    path, first = healthy_requests()[0]
    assert reply_text(path, httpx.post(server.base_url + path, json=first, timeout=TIMEOUT_S).json()) == expected[0]


def test_every_non_2xx_response_is_counted_by_status(setup):
    server, _, _ = setup
    before = server.request_errors()
    url = server.base_url
    statuses = [
        httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": -1}).status_code,
        httpx.post(url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
                   ).status_code,
        httpx.post(url + "/v1/completions", json={"prompt": "hi", "model": "nope"}).status_code,
        httpx.get(url + "/v1/nothing-here").status_code,
        httpx.get(url + "/v1/completions").status_code,
    ]
    assert statuses == [400, 400, 404, 404, 405]
    after = server.request_errors()
    assert {s: after[s] - before.get(s, 0) for s in after if after[s] != before.get(s, 0)} == {400: 2, 404: 2, 405: 1}
    assert_idle(server)

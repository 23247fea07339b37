"""`fovea serve` on a tiny BLIP-2 (no chat template of its own): /v1/completions equals `LLM.generate`, the waiting-queue
limit answers 503, and clients that leave (mid-stream or while waiting for a whole response) have their
requests aborted with every KV block freed."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from fovea import LLM, SamplingParams
from tests.entrypoints import ServerProcess
from tests.entrypoints import restore_torch_threads  # noqa: F401 (an autouse fixture)
from tests.oracle.blip2 import build_tiny_blip2

MAX_POSITIONS = 2048  # long enough that a request of LONG tokens outlives every check below
LONG = 1800


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return build_tiny_blip2(tmp_path_factory.mktemp("blip_server"), seed=0, max_position_embeddings=MAX_POSITIONS)


@pytest.fixture(scope="module")
def server(blip_dir, tmp_path_factory):
    proc = ServerProcess(blip_dir, "--max-num-seqs", "2", "--max-waiting-requests", "2", "--num-kv-blocks", "640",
                         log_dir=tmp_path_factory.mktemp("blip_server_log"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def llm(blip_dir):
    return LLM(str(blip_dir), dtype="float32", num_kv_blocks=256, num_threads=1)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


GREEDY = SamplingParams(temperature=0.0, max_tokens=20)


def test_completions_equal_offline_for_text_token_ids_and_several_prompts(client, llm, model):
    prompts = ["a photo of", "Question: what colour is the sky? Answer:"]
    expected = llm.generate(prompts, GREEDY, use_tqdm=False)
    one = client.completions.create(model=model, prompt=prompts[0], max_tokens=20, temperature=0.0)
    assert one.choices[0].text == expected[0].outputs[0].text
    assert one.usage.prompt_tokens == len(expected[0].prompt_token_ids)
    assert one.usage.completion_tokens == len(expected[0].outputs[0].token_ids)
    by_ids = client.completions.create(model=model, prompt=expected[0].prompt_token_ids, max_tokens=20,
                                       temperature=0.0)
    assert by_ids.choices[0].text == expected[0].outputs[0].text
    both = client.completions.create(model=model, prompt=prompts, max_tokens=20, temperature=0.0)
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == [e.outputs[0].text for e in expected]
    assert both.usage.prompt_tokens == sum(len(e.prompt_token_ids) for e in expected)


def test_streamed_completions_concatenate_per_choice(client, llm, model):
    prompts = ["a photo of", "a picture of two"]
    expected = llm.generate(prompts, GREEDY, use_tqdm=False)
    texts, usage = ["", ""], None
    for chunk in client.completions.create(model=model, prompt=prompts, max_tokens=20, temperature=0.0, stream=True,
                                           stream_options={"include_usage": True}):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
        usage = chunk.usage or usage
    assert texts == [e.outputs[0].text for e in expected]
    assert usage.completion_tokens == sum(len(e.outputs[0].token_ids) for e in expected)


def test_completion_logprobs_equal_offline(client, llm, model):
    expected = llm.generate("a photo of", SamplingParams(temperature=0.0, max_tokens=6, logprobs=3),
                            use_tqdm=False)[0].outputs[0]
    reply = client.completions.create(model=model, prompt="a photo of", max_tokens=6, temperature=0.0, logprobs=3)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(expected.token_ids)
    for lp, token_id, offline in zip(logprobs.token_logprobs, expected.token_ids, expected.logprobs):
        assert lp == pytest.approx(offline[token_id].logprob, abs=1e-4)
    assert all(len(top) == 3 for top in logprobs.top_logprobs)
    assert "".join(logprobs.tokens) == reply.choices[0].text


def test_echo_with_logprobs_scores_the_prompt_as_offline(client, llm, model):
    """echo: the prompt before the completion; with logprobs, its tokens' logprobs (the first null) equal
    LLM.generate's prompt_logprobs, streamed or not."""
    prompt = "Question: what colour is the sky? Answer:"
    expected = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=5, logprobs=2, prompt_logprobs=2),
                            use_tqdm=False)[0]
    ids = expected.prompt_token_ids
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0.0, logprobs=2, echo=True)
    choice = reply.choices[0]
    assert choice.text == prompt + expected.outputs[0].text
    lps = choice.logprobs
    assert len(lps.tokens) == len(ids) + len(expected.outputs[0].token_ids)
    assert lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert lps.token_logprobs[i] == pytest.approx(expected.prompt_logprobs[i][ids[i]].logprob, abs=1e-4)
        assert len(lps.top_logprobs[i]) == 2
    assert lps.text_offset == sorted(lps.text_offset)
    plain = client.completions.create(model=model, prompt=ids, max_tokens=5, temperature=0.0, echo=True)
    assert plain.choices[0].text.endswith(expected.outputs[0].text) and plain.choices[0].logprobs is None
    assert plain.choices[0].text != expected.outputs[0].text  # the decoded prompt comes first
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0.0, logprobs=2,
                                            echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    first = chunks[0].choices[0]  # the echoed prompt, with its logprobs
    assert first.text == prompt and first.logprobs.token_logprobs == pytest.approx(lps.token_logprobs[:len(ids)])


def test_use_beam_search_equals_offline_beam_search(client, llm, model, server):
    """vLLM's extras `use_beam_search` / `length_penalty`: n beams, the choices best first, as LLM.beam_search."""
    from fovea import BeamSearchParams

    prompts = ["a photo of", "Question: what colour is the sky? Answer:"]
    expected = llm.beam_search(prompts, BeamSearchParams(beam_width=3, max_tokens=6, length_penalty=0.5))
    reply = client.completions.create(model=model, prompt=prompts, max_tokens=6, n=3,
                                      extra_body={"use_beam_search": True, "length_penalty": 0.5})
    assert [c.text for c in reply.choices] == [s.text for out in expected for s in out.sequences]
    assert [c.index for c in reply.choices] == list(range(6))
    chat = httpx.post(server.base_url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "n": 2, "use_beam_search": True})
    assert chat.status_code == 200, chat.text
    assert len(chat.json()["choices"]) == 2
    for extra, param in [({"stream": True}, "stream"), ({"stop": ["x"]}, "stop"), ({"temperature": 0.7}, "temperature"),
                         ({"logprobs": 2}, "logprobs")]:
        response = httpx.post(server.base_url + "/v1/completions", timeout=30,
                              json={"prompt": "a", "n": 2, "use_beam_search": True, **extra})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


@pytest.mark.parametrize("body, status, param, text", [
    ({"prompt": []}, 400, "prompt", None),
    ({"prompt": "a", "suffix": "b"}, 400, "suffix", None),
    ({"prompt": "a", "best_of": 3}, 400, "best_of", None),
    ({"prompt": [1, 2, 10**6]}, 400, None, "vocabulary"),
    ({"prompt": "a", "max_tokens": MAX_POSITIONS}, 400, None, "max_model_len"),
    ({"prompt": "a", "model": "other"}, 404, "model", None),
])
def test_completion_errors(server, body, status, param, text):
    response = httpx.post(server.base_url + "/v1/completions", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert param is None or error["param"] == param
    assert text is None or text in error["message"]


def test_chat_on_a_checkpoint_without_template_is_the_fallback_prompt_as_a_completion(client, model):
    """The checkpoint has no chat template: chat renders fovea's BLIP-2 fallback ("Question: ... Answer:"), the
    same prompt a completions client writes (test_chat_fallback.py has the rest)."""
    chatted = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=8, temperature=0.0)
    completed = client.completions.create(model=model, prompt="Question: hi Answer:", max_tokens=8, temperature=0.0)
    assert chatted.choices[0].message.content == completed.choices[0].text
    assert chatted.usage.prompt_tokens == completed.usage.prompt_tokens


# ---- queue limit and disconnects -----------------------------------------------------------------------------


async def open_stream(client: httpx.AsyncClient, prompt: str):
    """Start a LONG streaming completion and return once its headers arrived (the request is in the engine)."""
    body = {"prompt": prompt, "max_tokens": LONG, "ignore_eos": True, "temperature": 0.0, "stream": True}
    request = client.build_request("POST", "/v1/completions", json=body)
    response = await client.send(request, stream=True)
    assert response.status_code == 200, await response.aread()
    return response


async def wait_for(server: ServerProcess, predicate, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = await asyncio.to_thread(server.metrics)
        if predicate(metrics) or time.monotonic() > deadline:
            return metrics
        await asyncio.sleep(0.05)


def test_waiting_queue_over_the_limit_is_503_and_leaving_clients_free_everything(server):
    before = server.wait_idle()

    async def scenario():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            # 2 run (max-num-seqs 2), 2 wait (max-waiting-requests 2); the fifth finds the queue full
            streams = [await open_stream(client, f"a photo of {i}") for i in range(4)]
            metrics = await wait_for(server, lambda m: m["fovea:num_requests_waiting"] == 2)
            assert metrics["fovea:num_requests_running"] == 2 and metrics["fovea:num_requests_waiting"] == 2
            refused = await client.post("/v1/completions", json={"prompt": "one more", "max_tokens": 4})
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "overloaded"
            # read a little of a running stream, then every client leaves
            lines = streams[0].aiter_lines()
            assert (await anext(lines)).startswith("data: ")
            for response in streams:
                await response.aclose()

    asyncio.run(scenario())
    after = server.wait_idle()
    assert after["fovea:kv_cache_blocks_used"] == 0 and after["fovea:num_requests_running"] == 0
    # aborted, not finished: no request completed and far fewer than 4 * LONG tokens were made
    assert after["fovea:request_success_total"] == before["fovea:request_success_total"]
    assert after["fovea:generation_tokens_total"] - before["fovea:generation_tokens_total"] < LONG


def test_clients_dropping_mid_stream_leave_no_running_request(server):
    before = server.wait_idle()

    async def scenario():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            streams = [await open_stream(client, f"a picture of {i}") for i in range(2)]
            for response in streams:
                num_content = 0
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                        num_content += 1
                    if num_content == 3:
                        break
                await response.aclose()

    asyncio.run(scenario())
    after = server.wait_idle()
    assert after["fovea:num_requests_running"] == 0 and after["fovea:num_requests_waiting"] == 0
    assert after["fovea:kv_cache_blocks_used"] == 0
    assert after["fovea:request_success_total"] == before["fovea:request_success_total"]


def test_a_client_leaving_before_a_whole_response_aborts_it(server):
    before = server.wait_idle()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/completions", timeout=httpx.Timeout(30, read=1.0),
                   json={"prompt": "a photo of", "max_tokens": LONG, "ignore_eos": True})
    after = server.wait_idle()
    assert after["fovea:kv_cache_blocks_used"] == 0 and after["fovea:num_requests_running"] == 0
    assert after["fovea:request_success_total"] == before["fovea:request_success_total"]

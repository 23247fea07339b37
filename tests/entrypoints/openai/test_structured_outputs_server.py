"""Structured outputs through `fovea serve` (tiny random Qwen2) with the openai client: OpenAI's response_format
(json_object, json_schema) and vLLM's structured_outputs (json, regex, choice, grammar) on both endpoints,
concurrent constrained and unconstrained requests, and a 400 naming the problem for a bad schema or regex."""
from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pytest

from tests.engine.test_structured_outputs import CHOICES, REGEXES, SCHEMAS
from tests.entrypoints import ServerProcess
from tests.entrypoints import restore_torch_threads  # noqa: F401 (an autouse fixture)
from tests.oracle.qwen2_5_vl import build_tiny_qwen2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = build_tiny_qwen2(tmp_path_factory.mktemp("structured_server"), seed=0)
    proc = ServerProcess(ckpt, "--max-num-seqs", "16", "--num-kv-blocks", "512",
                         log_dir=tmp_path_factory.mktemp("structured_server_log"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_constrained_and_free_requests_together(client, server):
    async def run():
        model = (await client.models.list()).data[0].id
        jobs = []
        for i, schema in enumerate(SCHEMAS):
            jobs.append(("json", schema, client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"ask {i}"}], max_tokens=300, seed=i,
                response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}})))
        # completions take response_format too (as vLLM's); the prompt of a json_object request of the offline
        # test, greedy, where the random model closes its object (a JSON object has no length limit)
        jobs.append(("json_object", None, client.completions.create(
            model=model, prompt="request 3: give me the answer", max_tokens=400, temperature=0.0,
            extra_body={"response_format": {"type": "json_object"}})))
        jobs.append(("choice", CHOICES, client.completions.create(
            model=model, prompt="pick", max_tokens=50, seed=3, extra_body={"structured_outputs": {"choice": CHOICES}})))
        for i, regex in enumerate(REGEXES):
            jobs.append(("regex", regex, client.completions.create(
                model=model, prompt=f"r{i}", max_tokens=50, seed=i, extra_body={"structured_outputs": {"regex": regex}})))
        jobs.append(("json", SCHEMAS[0], client.completions.create(
            model=model, prompt="j", max_tokens=300, n=3, seed=5, extra_body={"structured_outputs": {"json": SCHEMAS[0]}})))
        jobs.append(("grammar", None, client.completions.create(
            model=model, prompt="g", max_tokens=50, seed=1,
            extra_body={"structured_outputs": {"grammar": 'start: "(" NUM ")"\nNUM: /[0-9]{1,3}/'}})))
        jobs.append(("free", None, client.completions.create(model=model, prompt="free", max_tokens=20,
                                                             extra_body={"ignore_eos": True})))
        results = await asyncio.gather(*(job for _, _, job in jobs))
        return [(kind, target, r) for (kind, target, _), r in zip(jobs, results)]

    for kind, target, response in asyncio.run(run()):
        for choice in response.choices:
            text = choice.message.content if hasattr(choice, "message") else choice.text
            if kind == "free":
                assert response.usage.completion_tokens == 20
                continue
            assert choice.finish_reason == "stop", (kind, text)
            if kind == "json":
                jsonschema.validate(json.loads(text), target)
            elif kind == "json_object":
                assert isinstance(json.loads(text), dict)
            elif kind == "choice":
                assert text in target
            elif kind == "regex":
                assert re.fullmatch(target, text), (target, text)
            else:
                assert re.fullmatch(r"\([0-9]{1,3}\)", text), text


@pytest.mark.parametrize("body, words", [
    ({"structured_outputs": {"json": {"type": "nonsense"}}}, ["structured_outputs.json", "nonsense"]),
    ({"structured_outputs": {"regex": "a(b"}}, ["structured_outputs.regex", "unclosed group"]),
    ({"structured_outputs": {"grammar": "start: nothing"}}, ["structured_outputs.grammar", "nothing"]),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, ["exactly one of"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}},
     ["structured_outputs.json"]),
])
def test_invalid_constraints_are_400_naming_the_problem(server, body, words):
    response = httpx.post(server.base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 5, **body},
                          timeout=60)
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert all(word in message for word in words), message
    # the server is still serving
    ok = httpx.post(server.base_url + "/v1/completions", json={
        "prompt": "x", "max_tokens": 5, "structured_outputs": {"choice": ["fine"]}}, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "fine"

"""Ray Serve: fovea's OpenAI server as 2 engine replicas behind one endpoint, on the session's local Ray, driven
by a real HTTP client. Replies equal the offline engine's for the same request; same-prefix requests stick to
one replica; the single-process server's safety options hold; /metrics has every replica; a replica killed
mid-run is replaced, its non-streamed requests are retried and its open streams end with a clear error."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time

import httpx
import openai
import pytest

import fovea.ray
from fovea import LLM, SamplingParams
from fovea.entrypoints.media_config import MediaConfig
from tests.entrypoints import data_url, free_port, random_image
from tests.entrypoints import restore_torch_threads  # noqa: F401 (an autouse fixture)
from tests.oracle.qwen2_5_vl import build_tiny_qwen2_5_vl

API_KEY = "sk-ray"
MODEL = "tiny-qwen"
MAX_MEDIA_BYTES = 60_000
ENGINE = dict(dtype="float32", max_model_len=512, num_kv_blocks=512)
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return str(build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen_ray_serve"), seed=0))


@pytest.fixture(scope="module")
def endpoint(ray_local, qwen_dir):
    port = free_port()
    fovea.ray.deploy(qwen_dir, scaling=fovea.ray.ReplicaScaling(num_replicas=2), port=port,
                     server=fovea.ray.ServeOptions(served_model_names=(MODEL,), api_key=API_KEY,
                                                   media=MediaConfig(max_media_bytes=MAX_MEDIA_BYTES)), **ENGINE)
    yield f"http://127.0.0.1:{port}"
    fovea.ray.shutdown()
    from ray import serve

    serve.shutdown()


@pytest.fixture(scope="module")
def llm(qwen_dir):
    return LLM(qwen_dir, num_threads=1, **ENGINE)


def messages(image, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                         {"type": "text", "text": text}]}]


def reference(llm: LLM, image, text: str, max_tokens: int, ignore_eos: bool = False):
    """The offline engine's answer to the same chat: the checkpoint's template, then generate."""
    tokenizer = llm.get_tokenizer()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}], tokenize=False,
        add_generation_prompt=True)
    request = {"prompt_token_ids": tokenizer.encode(prompt, add_special_tokens=False),
               "multi_modal_data": {"image": image}}
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos)
    return llm.generate(request, params, use_tqdm=False)[0].outputs[0]


def body(image, text: str, max_tokens: int, **extra) -> dict:
    return {"model": MODEL, "messages": messages(image, text), "max_tokens": max_tokens, "temperature": 0.0, **extra}


def stream_text(lines: list[str]) -> tuple[str, list[dict]]:
    """(the streamed text, the error events) of a chat stream's `data:` lines, which must end with [DONE]."""
    events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    return text, [c["error"] for c in chunks if "error" in c]


async def post(client: httpx.AsyncClient, url: str, payload: dict) -> tuple[int, str, str]:
    """(status, replica, text) of one chat request; a streamed one is read event by event."""
    if payload.get("stream"):
        async with client.stream("POST", url, json=payload, headers=AUTH) as reply:
            lines = [line async for line in reply.aiter_lines()]
            text, errors = stream_text(lines)
            assert not errors, errors
            return reply.status_code, reply.headers["x-fovea-replica"], text
    reply = await client.post(url, json=payload, headers=AUTH)
    assert reply.status_code == 200, reply.text
    return 200, reply.headers["x-fovea-replica"], reply.json()["choices"][0]["message"]["content"]


def test_40_concurrent_chats_with_images_equal_offline_on_both_replicas(endpoint, llm):
    images = [random_image(i, 40 + 9 * (i % 5), 36 + 7 * (i % 3)) for i in range(20)]
    requests = [(images[i % 20], f"what is in picture {i % 3}?", 6 + i % 7, i % 4 == 0) for i in range(40)]
    expected = [reference(llm, image, text, n).text for image, text, n, _ in requests]

    async def run():
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            return await asyncio.gather(*(post(client, endpoint + "/v1/chat/completions",
                                                body(image, text, n, stream=is_stream))
                                           for image, text, n, is_stream in requests))

    replies = asyncio.run(run())
    assert [text for _, _, text in replies] == expected
    assert len({replica for _, replica, _ in replies}) == 2  # both replicas answered
    assert len(set(expected)) > 10  # the images matter: a constant model could not pass


def test_official_client_and_same_prefix_requests_stick_to_one_replica(endpoint, llm):
    client = openai.OpenAI(base_url=endpoint + "/v1", api_key=API_KEY, max_retries=0, timeout=TIMEOUT_S)
    image = random_image(99, 64, 48)
    replicas = []
    for _ in range(4):
        raw = client.chat.completions.with_raw_response.create(**body(image, "describe it", 8))
        assert raw.parse().choices[0].message.content == reference(llm, image, "describe it", 8).text
        replicas.append(raw.headers["x-fovea-replica"])
    assert len(set(replicas)) == 1, replicas
    # ... and that replica's prefix cache served the repeats: its own series in the merged /metrics
    text = httpx.get(endpoint + "/metrics", timeout=TIMEOUT_S).text
    hits = re.search(rf'^fovea:prefix_cache_hits_total{{[^}}]*replica="{replicas[0]}"[^}}]*}} (\S+)$', text, re.M)
    assert hits and float(hits.group(1)) > 0, text[:2000]


def test_safety_options_and_metrics_of_every_replica(endpoint):
    image = random_image(5, 40, 40)
    assert httpx.post(endpoint + "/v1/chat/completions", json=body(image, "hi", 4), timeout=TIMEOUT_S
                      ).status_code == 401  # no API key
    big = random_image(6, 400, 300)  # ~360 kB of PNG: over --max-media-bytes
    reply = httpx.post(endpoint + "/v1/chat/completions", json=body(big, "hi", 4), headers=AUTH, timeout=TIMEOUT_S)
    assert reply.status_code == 413 and "--max-media-bytes" in reply.json()["error"]["message"]
    reply = httpx.post(endpoint + "/v1/chat/completions", json={**body(image, "hi", 4), "temperature": -1},
                       headers=AUTH, timeout=TIMEOUT_S)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "temperature"
    urls = httpx.get(endpoint + "/metrics/replicas", timeout=TIMEOUT_S).json()
    assert len(urls) == 2
    text = httpx.get(endpoint + "/metrics", timeout=TIMEOUT_S).text
    for replica, url in urls.items():
        assert f'replica="{replica}"' in text
        assert "fovea:kv_cache_blocks_total" in httpx.get(url, timeout=TIMEOUT_S).text  # each replica's own


def test_a_killed_replica_is_replaced_its_requests_retried_or_failed_clearly(ray_local, endpoint, llm):
    from fovea.entrypoints.ray.replica_metrics import metrics_directory

    pids = ray_local.get(metrics_directory("fovea").pids.remote())
    url = endpoint + "/v1/chat/completions"
    text, num_tokens = "tell a long story", 300
    # Where each image goes: same-prefix requests stick to one replica (shown above), so a short request first
    # tells where the long one will run. Enough images that each replica has two.
    placed: dict[str, list] = {replica: [] for replica in pids}
    seed = 300
    while min(map(len, placed.values())) < 2:
        image = random_image(seed, 48, 40)
        seed += 1
        reply = httpx.post(url, json=body(image, text, 1), headers=AUTH, timeout=TIMEOUT_S)
        placed[reply.headers["x-fovea-replica"]].append(image)
    victim = next(r for r in placed if len(placed[r]) >= 2)
    # on each replica: one streamed request, the others not streamed
    work = [(replica, image, i == 0) for replica, images in placed.items() for i, image in enumerate(images)]
    started = asyncio.Event()

    async def one(client, replica, image, is_stream):
        payload = body(image, text, num_tokens, stream=is_stream, ignore_eos=True)
        if not is_stream:
            reply = await client.post(url, json=payload, headers=AUTH)
            return reply.status_code, reply.headers, reply.json()
        async with client.stream("POST", url, json=payload, headers=AUTH) as reply:
            lines = []
            async for line in reply.aiter_lines():
                lines.append(line)
                if len(lines) == 3 and replica == victim:  # the victim's stream has started: kill it now
                    started.set()
            return reply.status_code, reply.headers, lines

    async def run():
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            tasks = [asyncio.ensure_future(one(client, *w)) for w in work]
            await asyncio.wait_for(started.wait(), TIMEOUT_S)
            os.kill(pids[victim], signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT_S)  # every request ends: no hang

    replies = asyncio.run(run())
    for (replica, image, is_stream), (status, headers, content) in zip(work, replies):
        # the requests ignore EOS, so the reference must too: which images run depends on where each replica's
        # placement probes land, and for some of them EOS becomes the greedy token within the 300
        expected = reference(llm, image, text, num_tokens, ignore_eos=True).text
        assert status == 200
        if not is_stream:  # answered in full; the victim's were sent again, to the other replica
            assert content["choices"][0]["message"]["content"] == expected
            assert (int(headers.get("x-fovea-attempts", "1")) > 1) == (replica == victim)
            assert headers["x-fovea-replica"] != victim
            continue
        streamed, errors = stream_text(content)
        assert headers["x-fovea-replica"] == replica
        if replica == victim:  # what was sent stands, then one error event names the cause, then [DONE]
            assert len(errors) == 1 and errors[0]["code"] == "replica_died", errors
            assert "died" in errors[0]["message"] and expected.startswith(streamed) and streamed != expected
        else:
            assert not errors and streamed == expected

    # Serve replaces the replica: two live ones again, the victim gone, and requests are answered
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        live = httpx.get(endpoint + "/metrics/replicas", timeout=TIMEOUT_S).json()
        if len(live) == 2 and victim not in live:
            break
        time.sleep(1.0)
    assert len(live) == 2 and victim not in live, live
    image = placed[victim][0]
    reply = httpx.post(url, json=body(image, "again", 5), headers=AUTH, timeout=TIMEOUT_S)
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["message"]["content"] == reference(llm, image, "again", 5).text

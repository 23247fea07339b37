"""`fovea serve` on a tiny Qwen2.5-VL (it has a chat template), driven by the official `openai` client and by raw
HTTP: chat completions equal `LLM.generate` on the same inputs, streams concatenate to the same text, seeded
`n=2` is reproducible, and every refusal has its status code and OpenAI's error shape."""
from __future__ import annotations

import base64
import http.server
import io

import httpx
import numpy as np
import openai
import pytest

from fovea import LLM, SamplingParams
from tests.entrypoints import ServerProcess, data_url, loopback_http_server, png_bytes, random_image
from tests.entrypoints import restore_torch_threads  # noqa: F401 (an autouse fixture)
from tests.entrypoints.media_bombs import png_bomb
from tests.oracle.qwen2_5_vl import build_tiny_qwen2_5_vl

API_KEY = "sk-test"
MODEL = "tiny-qwen"
MAX_MODEL_LEN = 512
MAX_MEDIA_BYTES = 60_000
IMAGE = random_image(0, 120, 90)
BIG_IMAGE = random_image(1, 400, 300)  # ~360 kB of PNG (noise does not compress): over the cap


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen_server"), seed=0)


@pytest.fixture(scope="module")
def media_server():
    """A loopback HTTP server with one small and one big image, for `image_url` fetching."""
    files = {"/small.png": png_bytes(IMAGE), "/big.png": png_bytes(BIG_IMAGE)}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = files.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

    with loopback_http_server(Handler) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("allowed_media")
    (folder / "image.png").write_bytes(png_bytes(IMAGE))
    return folder


@pytest.fixture(scope="module")
def server(qwen_dir, media_dir, tmp_path_factory):
    proc = ServerProcess(qwen_dir, "--api-key", API_KEY, "--served-model-name", MODEL, "--max-model-len",
                         str(MAX_MODEL_LEN), "--num-kv-blocks", "768", "--max-media-bytes", str(MAX_MEDIA_BYTES),
                         "--allowed-local-media-path", str(media_dir), "--allowed-media-domains", "127.0.0.1",
                         log_dir=tmp_path_factory.mktemp("qwen_server_log"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def llm(qwen_dir):
    return LLM(str(qwen_dir), dtype="float32", max_model_len=MAX_MODEL_LEN, num_kv_blocks=128, num_threads=1)


def image_message(url: str, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def reference(llm: LLM, text: str, params: SamplingParams, image=IMAGE):
    """What the server should answer, computed offline: the template rendered by transformers, then generate."""
    tokenizer = llm.get_tokenizer()
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": text}]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                           add_generation_prompt=True)
    request = {"prompt_token_ids": tokenizer.encode(prompt, add_special_tokens=False)}
    if image is not None:
        request["multi_modal_data"] = {"image": image}
    return llm.generate(request, params, use_tqdm=False)[0]


GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


def test_chat_with_base64_image_equals_offline_generate(client, llm):
    expected = reference(llm, "What is in the picture?", GREEDY)
    reply = client.chat.completions.create(model=MODEL, messages=image_message(data_url(IMAGE), "What is in the "
                                           "picture?"), temperature=0.0, max_tokens=24)
    choice = reply.choices[0]
    assert choice.message.content == expected.outputs[0].text
    assert choice.message.role == "assistant"
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert reply.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model == MODEL and reply.id.startswith("chatcmpl-")


def test_streamed_chunks_concatenate_to_the_same_text(client, llm):
    expected = reference(llm, "Describe it.", GREEDY)
    stream = client.chat.completions.create(model=MODEL, messages=image_message(data_url(IMAGE), "Describe it."),
                                            temperature=0.0, max_tokens=24, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.outputs[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [expected.outputs[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_with_a_stop_string_never_sends_what_the_stop_cuts(client, llm):
    full = reference(llm, "Describe it.", GREEDY).outputs[0].text
    stop = full[6:9]  # ends the text mid-way; its first characters arrive a step before the match completes
    expected = reference(llm, "Describe it.", SamplingParams(temperature=0.0, max_tokens=24, stop=[stop]))
    assert expected.outputs[0].finish_reason == "stop"
    stream = client.chat.completions.create(model=MODEL, messages=image_message(data_url(IMAGE), "Describe it."),
                                            temperature=0.0, max_tokens=24, stop=[stop], stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == expected.outputs[0].text == full[:full.index(stop)]


def test_logprobs_equal_offline_in_both_response_kinds(client, llm):
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=2)
    expected = reference(llm, "Name one colour.", params).outputs[0]
    messages = image_message(data_url(IMAGE), "Name one colour.")
    reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0.0, max_tokens=8,
                                           logprobs=True, top_logprobs=2)
    streamed = [e for c in client.chat.completions.create(model=MODEL, messages=messages, temperature=0.0,
                                                          max_tokens=8, logprobs=True, top_logprobs=2, stream=True)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    for content in (reply.choices[0].logprobs.content, streamed):
        assert len(content) == len(expected.token_ids)
        for entry, token_id, offline in zip(content, expected.token_ids, expected.logprobs):
            assert entry.logprob == pytest.approx(offline[token_id].logprob, abs=1e-4)
            assert len(entry.top_logprobs) == 2
            assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_n2_with_seed_gives_two_reproducible_choices_equal_offline(client, llm):
    params = SamplingParams(n=2, temperature=1.0, seed=1234, max_tokens=12)
    expected = reference(llm, "Tell a story.", params)
    kwargs = dict(model=MODEL, messages=image_message(data_url(IMAGE), "Tell a story."), n=2, seed=1234,
                  temperature=1.0, max_tokens=12)
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in sorted(first.choices, key=lambda c: c.index)]
    assert texts == [c.message.content for c in sorted(second.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in expected.outputs]
    assert texts[0] != texts[1]
    assert first.usage.completion_tokens == sum(len(c.token_ids) for c in expected.outputs)


def test_image_over_http_or_from_an_allowed_file_equals_the_data_url(client, media_server, media_dir):
    def reply(url: str) -> str:
        return client.chat.completions.create(model=MODEL, messages=image_message(url, "Hi"), temperature=0.0,
                                              max_tokens=10).choices[0].message.content

    by_data = reply(data_url(IMAGE))
    assert reply(media_server + "/small.png") == by_data
    assert reply(f"file://{media_dir / 'image.png'}") == by_data


def test_video_url_equals_offline_chat(client, llm):
    import av  # PyAV: encode a short clip to send as a data URL

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(6):
            frame = av.VideoFrame.from_ndarray(np.asarray(random_image(10 + i, 64, 48)), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    url = "data:video/mp4;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                             {"type": "text", "text": "What happens?"}]}]
    expected = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0.0, max_tokens=24)
    assert reply.choices[0].message.content == expected.outputs[0].text
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.base_url + "/health").status_code == 200  # no key needed outside /v1
    metrics = server.metrics()
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_blocks_used", "num_preemptions_total",
                 "prompt_tokens_total", "generation_tokens_total", "time_to_first_token_seconds_count",
                 "time_per_output_token_seconds_count", "prefix_cache_hits_total"):
        assert f"fovea:{name}" in metrics, name
    assert metrics["fovea:generation_tokens_total"] > 0


# ---- errors --------------------------------------------------------------------------------------------------


def post(server, body, key: str | None = API_KEY, path="/v1/chat/completions", **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.base_url + path, json=body, headers=headers, timeout=60, **kwargs)


def good_body(**changes) -> dict:
    body = {"model": MODEL, "messages": image_message(data_url(IMAGE), "Hi"), "max_tokens": 4, "temperature": 0.0}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def assert_error(response: httpx.Response, status: int, param: str | None = None, text: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error
    if text is not None:
        assert text in error["message"], error
    return error


@pytest.mark.parametrize("changes, param, text", [
    ({"temperature": 3}, "temperature", "less than or equal to 2"),
    ({"n": 0}, "n", None),
    ({"max_tokens": 0}, "max_tokens", None),
    ({"top_p": 0}, "top_p", None),
    ({"presence_penalty": -3}, "presence_penalty", None),
    ({"top_logprobs": 2}, "top_logprobs", "logprobs"),
    ({"n": 2, "temperature": 0.0}, "n", "greedily"),
    ({"stop": 7}, "stop", None),
    ({"messages": []}, "messages", None),
    ({"messages": None}, "messages", "required"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "stream"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias", None),
    ({"max_tokens": MAX_MODEL_LEN}, None, "max_model_len"),
    ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]}, "messages",
     "messages.0.content.0: Input tag 'audio'"),
    ({"messages": image_message("data:image/png;base64," + "QUJD" * 20, "Hi")}, None, "decode"),
    ({"messages": image_message("file:///etc/passwd", "Hi")}, None, "outside --allowed-local-media-path"),
    ({"messages": image_message("http://127.0.0.1:9/none.png", "Hi")}, None, "could not fetch"),
    ({"messages": image_message("http://localhost:9/none.png", "Hi")}, None, "not in --allowed-media-domains"),
    ({"messages": image_message("http://169.254.169.254/latest/meta-data/", "Hi")}, None,
     "not in --allowed-media-domains"),
])
def test_invalid_requests_are_400_naming_the_field(server, changes, param, text):
    assert_error(post(server, good_body(**changes)), 400, param, text)


def test_unknown_fields_are_ignored_and_bad_json_is_400(server):
    assert post(server, good_body(some_future_field={"x": 1}, user="u1")).status_code == 200
    response = httpx.post(server.base_url + "/v1/chat/completions", content=b"{not json",
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert_error(response, 400, text="JSON")


def test_api_key_is_required_on_v1(server):
    assert_error(post(server, good_body(), key=None), 401)
    assert_error(post(server, good_body(), key="wrong"), 401)
    bad_client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_client.models.list()


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"


def test_media_over_the_cap_is_413(server, media_server):
    assert len(png_bytes(BIG_IMAGE)) > MAX_MEDIA_BYTES
    error = assert_error(post(server, good_body(messages=image_message(data_url(BIG_IMAGE), "Hi"))), 413)
    assert error["code"] == "media_too_large" and str(MAX_MEDIA_BYTES) in error["message"]
    assert_error(post(server, good_body(messages=image_message(media_server + "/big.png", "Hi"))), 413)
    assert post(server, good_body(messages=image_message(media_server + "/small.png", "Hi"))).status_code == 200


def test_image_bomb_is_413_naming_the_limit(server):
    """A 20 KiB PNG declaring 13000 x 13000 (169 Mpx): refused from its header (default --max-image-pixels)."""
    bomb = "data:image/png;base64," + base64.b64encode(png_bomb()).decode()
    error = assert_error(post(server, good_body(messages=image_message(bomb, "Hi"))), 413)
    assert "--max-image-pixels" in error["message"] and "169,000,000" in error["message"]
    assert post(server, good_body(messages=image_message(data_url(IMAGE), "Hi"))).status_code == 200

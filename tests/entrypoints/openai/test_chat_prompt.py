"""`LLM.chat` and the server's /v1/chat/completions turn the same messages into the same engine prompt: the same
token ids (template, template variables, generation prompt) and the same images in the same order, whether the
server read them itself (a data URL, an allowed local file) or the engine's loaders will (LLM.chat).

The server runs in this process (uvicorn on a loopback port, driven by the `openai` client) so the prompt its
engine receives can be recorded."""
from __future__ import annotations

import threading
import time

import numpy as np
import openai
import pytest
import uvicorn
from PIL import Image

from fovea import LLM, SamplingParams
from fovea.config import EngineConfig
from fovea.engine.async_engine import AsyncLLMEngine
from fovea.engine.llm_engine import LLMEngine
from fovea.entrypoints.media_config import MediaConfig
from fovea.entrypoints.media_fetch import MediaFetcher
from fovea.entrypoints.openai.app import ServerSettings, build_app
from fovea.multimodal.media import load_image
from tests.entrypoints import data_url, free_port, random_image
from tests.entrypoints import restore_torch_threads  # noqa: F401 (an autouse fixture)
from tests.oracle.qwen2_5_vl import CHAT_TEMPLATE, build_tiny_qwen2_5_vl

ENGINE_OPTIONS = dict(dtype="float32", max_model_len=512, num_kv_blocks=64, num_threads=1)
# the tiny checkpoint's template with a variable in front, so chat_template_kwargs show in the prompt
TEMPLATE = "{{ preamble | default('') }}" + CHAT_TEMPLATE


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen_chat_prompt"), seed=0)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("media")
    random_image(1, 70, 50).save(path / "local.png")
    return path


@pytest.fixture(scope="module")
def server(qwen_dir, media_dir):
    """(base URL, prompts the engine received): a real server over an engine whose add_request is recorded."""
    engine = AsyncLLMEngine(LLMEngine(EngineConfig.from_kwargs(str(qwen_dir), **ENGINE_OPTIONS)))
    received = []
    add_request = engine.add_request

    async def recording_add_request(request_id, prompt, params, lora_request=None):
        received.append(prompt)
        return await add_request(request_id, prompt, params, lora_request)

    engine.add_request = recording_add_request
    settings = ServerSettings(chat_template=TEMPLATE, fetcher=MediaFetcher(MediaConfig(allowed_local_media_path=str(media_dir))))
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(build_app(engine, settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the in-process server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1", received
    uv.should_exit = True
    thread.join(timeout=60)


@pytest.fixture(scope="module")
def llm(qwen_dir):
    llm = LLM(str(qwen_dir), **ENGINE_OPTIONS)
    received = []
    add_request = llm.llm_engine.add_request

    def recording_add_request(request_id, prompt, params, lora_request=None):
        received.append(prompt)
        return add_request(request_id, prompt, params, lora_request=lora_request)

    llm.llm_engine.add_request = recording_add_request
    return llm, received


def pixels(item) -> np.ndarray:
    return np.asarray(load_image(item))


@pytest.mark.parametrize("template_options", [
    {},
    {"chat_template_kwargs": {"preamble": "Be brief. "}, "add_generation_prompt": False},
], ids=["defaults", "template variables, no generation prompt"])
def test_llm_chat_and_the_server_build_the_same_prompt(server, llm, media_dir, template_options):
    base_url, server_prompts = server
    llm, llm_prompts = llm
    messages = [
        {"role": "system", "content": "You describe pictures."},
        {"role": "user", "content": [
            {"type": "text", "text": "Compare"},
            {"type": "image_url", "image_url": {"url": data_url(random_image(0, 90, 60))}},
            {"type": "text", "text": "with"},
            {"type": "image_url", "image_url": {"url": (media_dir / "local.png").as_uri()}},
        ]},
    ]
    llm.chat(messages, SamplingParams(max_tokens=1), use_tqdm=False, chat_template=TEMPLATE, **template_options)
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    client.chat.completions.create(model=model, messages=messages, max_tokens=1, extra_body=template_options)
    ours, theirs = llm_prompts[-1], server_prompts[-1]

    assert ours["prompt_token_ids"] == theirs["prompt_token_ids"]
    text = llm.get_tokenizer().decode(ours["prompt_token_ids"])
    assert text.startswith("Be brief. ") == bool(template_options)
    assert text.endswith("<|im_start|>assistant\n") != bool(template_options)
    assert set(ours) == set(theirs) == {"prompt_token_ids", "multi_modal_data"}
    assert list(ours["multi_modal_data"]) == list(theirs["multi_modal_data"]) == ["image"]
    # the server read the file itself and decoded it within its media limits (never a path to the engine)
    assert isinstance(theirs["multi_modal_data"]["image"][1], Image.Image)
    ours_pixels = [pixels(item) for item in ours["multi_modal_data"]["image"]]
    theirs_pixels = [pixels(item) for item in theirs["multi_modal_data"]["image"]]
    assert [p.shape for p in ours_pixels] == [(60, 90, 3), (50, 70, 3)]
    assert all(np.array_equal(a, b) for a, b in zip(ours_pixels, theirs_pixels, strict=True))

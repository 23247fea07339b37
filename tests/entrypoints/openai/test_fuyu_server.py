"""`fovea serve` on a tiny Fuyu (no chat template, as adept/fuyu-8b) driven by the official `openai` client: the
server chats through fovea's Fuyu fallback (logged at start-up), and a chat completion with a base64 image answers
what transformers' FuyuProcessor + `generate` answer for the text that template renders; a `|SPEAKER|` typed into
a completion prompt is a 400 that names it."""
from __future__ import annotations

import openai
import pytest
import transformers

from tests.entrypoints import ServerProcess, data_url, random_image
from tests.entrypoints import restore_torch_threads  # noqa: F401 (an autouse fixture)
from tests.oracle.fuyu import build_tiny_fuyu, hf_reference

MODEL = "tiny-fuyu"


@pytest.fixture(scope="module")
def fuyu_dir(tmp_path_factory):
    path = build_tiny_fuyu(tmp_path_factory.mktemp("fuyu_server"), seed=3)
    assert not list(path.glob("chat_template*")), "the test checkpoint must have no chat template"
    return path


@pytest.fixture(scope="module")
def server(fuyu_dir, tmp_path_factory):
    proc = ServerProcess(fuyu_dir, "--served-model-name", MODEL, "--max-model-len", "256", "--dtype", "float32",
                         log_dir=tmp_path_factory.mktemp("fuyu_server_log"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_with_an_image_equals_transformers(client, server, fuyu_dir):
    assert "fovea's fallback for model type 'fuyu' (template_fuyu.jinja" in server.log_tail(100_000)
    image = random_image(3, 77, 52)
    text = "Generate a coco-style caption."
    reply = client.chat.completions.create(
        model=MODEL, temperature=0.0, max_tokens=12,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                               {"type": "text", "text": text}]}])
    ref_prompt, ref_ids, _ = hf_reference(fuyu_dir, text + "\n", [image], 12)
    tokenizer = transformers.AutoTokenizer.from_pretrained(fuyu_dir)
    choice = reply.choices[0]
    assert reply.usage.prompt_tokens == len(ref_prompt)
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 12
        assert choice.message.content == tokenizer.decode(ref_ids, skip_special_tokens=True)
    else:  # EOS (ignored by the reference) came first: the reply is the reference up to it
        eos = tokenizer.eos_token_id
        assert choice.finish_reason == "stop" and eos in ref_ids
        assert choice.message.content == tokenizer.decode(ref_ids[:ref_ids.index(eos)], skip_special_tokens=True)


def test_a_typed_placeholder_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="look: |SPEAKER|", max_tokens=2)
    assert "1 |SPEAKER| image token(s)" in str(err.value) and "no image fills" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(random_image(i, 20, 20))}} for i in range(2)]}])
    assert "at most 1 per prompt" in str(err.value)
    reply = client.completions.create(model=MODEL, prompt="Hello world!", max_tokens=2)
    assert reply.usage.completion_tokens <= 2

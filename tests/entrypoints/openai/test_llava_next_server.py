"""`fovea serve` on a tiny LLaVA-NeXT (CLIP + anyres + Llama) driven by the official `openai` client: a chat completion
with two base64 images of different aspect ratios (a 2x2 and a 3x1 tile grid) answers what transformers' own
LlavaNextProcessor + `generate` answer for the same conversation, and a mismatch of placeholders is a 400."""
from __future__ import annotations

import openai
import pytest
import transformers

from tests.entrypoints import ServerProcess, data_url, random_image
from tests.entrypoints import restore_torch_threads  # noqa: F401 (an autouse fixture)
from tests.oracle.llava_next import build_tiny_llava_next, hf_reference

MODEL = "tiny-llava-next"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llava_next(tmp_path_factory.mktemp("llava_next_server"), seed=0)


@pytest.fixture(scope="module")
def client(model_dir, tmp_path_factory):
    proc = ServerProcess(model_dir, "--served-model-name", MODEL, "--max-model-len", "512", "--dtype", "float32",
                         log_dir=tmp_path_factory.mktemp("llava_next_server_log"))
    yield openai.OpenAI(base_url=proc.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    proc.stop()


def test_chat_with_two_images_equals_transformers(client, model_dir):
    images = [random_image(3, 77, 52), random_image(4, 20, 90)]
    text = [{"type": "text", "text": "What is in the pictures?"}]
    reply = client.chat.completions.create(
        model=MODEL, temperature=0.0, max_tokens=12,
        messages=[{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": data_url(im)}}
                                                 for im in images), *text]}])
    processor = transformers.AutoProcessor.from_pretrained(model_dir)
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "image"}, *text]}],
                                           add_generation_prompt=True)
    assert prompt.startswith(processor.tokenizer.bos_token)  # the template's BOS; the processor then adds none
    ref_prompt, ref_ids, _ = hf_reference(model_dir, prompt[len(processor.tokenizer.bos_token):], images, 12)
    choice = reply.choices[0]
    assert reply.usage.prompt_tokens == len(ref_prompt)
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 12
        # the detokenizer holds back a trailing incomplete UTF-8 sequence (it renders as U+FFFD when decoded whole)
        assert choice.message.content == processor.tokenizer.decode(ref_ids, skip_special_tokens=True).rstrip("\ufffd")
    else:  # EOS (ignored by the reference) came first: the reply is the reference up to it
        eos = processor.tokenizer.eos_token_id
        assert choice.finish_reason == "stop" and eos in ref_ids
        assert choice.message.content == processor.tokenizer.decode(ref_ids[:ref_ids.index(eos)],
                                                                    skip_special_tokens=True)


def test_placeholders_without_images_are_a_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="USER: <image>\nHi ASSISTANT:", max_tokens=2)
    assert "1 image token(s)" in str(err.value) and "no image fills" in str(err.value)
    assert "as many as the image's size gives" in str(err.value)
    reply = client.completions.create(model=MODEL, prompt="USER: Hi ASSISTANT:", max_tokens=2)
    assert reply.usage.completion_tokens <= 2

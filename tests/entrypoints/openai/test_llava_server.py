"""`fovea serve` on a tiny LLaVA-1.5 (CLIP + Llama) driven by the official `openai` client: a chat completion
with a base64 image answers what transformers' own LlavaProcessor + `generate` answer for the same conversation
(the checkpoint's chat template, rendered by transformers), and a mismatch of placeholders is a 400."""
from __future__ import annotations

import openai
import pytest
import transformers

from tests.entrypoints import ServerProcess, data_url, random_image
from tests.entrypoints import restore_torch_threads  # noqa: F401 (an autouse fixture)
from tests.oracle.llava import build_tiny_llava, hf_reference

MODEL = "tiny-llava"


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("llava_server"), seed=0)


@pytest.fixture(scope="module")
def client(llava_dir, tmp_path_factory):
    proc = ServerProcess(llava_dir, "--served-model-name", MODEL, "--max-model-len", "256", "--dtype", "float32",
                         log_dir=tmp_path_factory.mktemp("llava_server_log"))
    yield openai.OpenAI(base_url=proc.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    proc.stop()


def test_chat_with_an_image_equals_transformers(client, llava_dir):
    image = random_image(3, 77, 52)
    content = [{"type": "text", "text": "What is in the picture?"}]
    reply = client.chat.completions.create(
        model=MODEL, temperature=0.0, max_tokens=12,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                               *content]}])
    processor = transformers.AutoProcessor.from_pretrained(llava_dir)
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, *content]}],
                                           add_generation_prompt=True)
    # the template starts with BOS; transformers' processor then adds none (apply_chat_template(tokenize=True)):
    # the same ids as the text after it with BOS added
    assert prompt.startswith(processor.tokenizer.bos_token)
    prompt = prompt[len(processor.tokenizer.bos_token):]
    ref_prompt, ref_ids, _ = hf_reference(llava_dir, prompt, [image], 12)
    choice = reply.choices[0]
    assert reply.usage.prompt_tokens == len(ref_prompt)
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 12
        # the detokenizer holds back a trailing incomplete UTF-8 sequence (it renders as U+FFFD when decoded whole)
        expected = processor.tokenizer.decode(ref_ids, skip_special_tokens=True)
        assert choice.message.content == expected.rstrip("\ufffd")
    else:  # EOS (ignored by the reference) came first: the reply is the reference up to it
        eos = processor.tokenizer.eos_token_id
        assert choice.finish_reason == "stop" and eos in ref_ids
        assert choice.message.content == processor.tokenizer.decode(ref_ids[:ref_ids.index(eos)],
                                                                    skip_special_tokens=True)


def test_placeholders_without_images_are_a_400(client):
    # /v1/completions takes no images: placeholders in its prompt can never be filled
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="USER: <image>\n<image>\nHi ASSISTANT:", max_tokens=2)
    assert "2 image token(s)" in str(err.value) and "no image fills" in str(err.value)
    # an image the chat template gives no placeholder for does not exist: this template always places one
    reply = client.completions.create(model=MODEL, prompt="USER: Hi ASSISTANT:", max_tokens=2)
    assert reply.usage.completion_tokens <= 2

"""`fovea serve` on a tiny Flan-T5 (an encoder-decoder) driven by the official `openai` client: /v1/completions
takes the prompt as the encoder's text and answers what transformers' `generate` answers; usage counts the
encoder's prompt; a prompt over the encoder's limit is a 400 naming it. On a tiny BLIP-2 over Flan-T5 (no chat
template in the checkpoint): /v1/chat/completions with an image answers what `LLM.chat` answers offline (fovea's
T5 fallback template), and `use_beam_search` what `LLM.beam_search` does."""
from __future__ import annotations

import openai
import pytest

from fovea import LLM, BeamSearchParams, SamplingParams
from tests.entrypoints import ServerProcess, data_url, random_image
from tests.entrypoints import restore_torch_threads  # noqa: F401 (an autouse fixture)
from tests.oracle.t5 import build_tiny_blip2_t5, build_tiny_t5, hf_reference, load_hf

MODEL = "tiny-flan-t5"


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return build_tiny_t5(tmp_path_factory.mktemp("t5_server"), seed=1, hub_form="flan")


@pytest.fixture(scope="module")
def client(t5_dir, tmp_path_factory):
    proc = ServerProcess(t5_dir, "--served-model-name", MODEL, "--max-model-len", "64", "--dtype", "float32",
                         log_dir=tmp_path_factory.mktemp("t5_server_log"))
    yield openai.OpenAI(base_url=proc.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    proc.stop()


@pytest.mark.parametrize("prompt", ["Question: how many cats are there? Answer:", "A photo of"])
def test_completion_equals_transformers(client, t5_dir, prompt):
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0.0, logprobs=1)
    _, tokenizer = load_hf(str(t5_dir))
    ref_ids, _ = hf_reference(t5_dir, prompt, None, 10)
    choice = reply.choices[0]
    assert reply.usage.prompt_tokens == len(tokenizer(prompt).input_ids)  # the encoder's prompt, </s> included
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 10
        assert choice.text == tokenizer.decode(ref_ids, skip_special_tokens=True).rstrip("\ufffd")
    else:  # EOS (ignored by the reference) came first
        assert choice.finish_reason == "stop" and 1 in ref_ids
        assert choice.text == tokenizer.decode(ref_ids[:ref_ids.index(1)], skip_special_tokens=True)


def test_prompt_over_the_encoder_limit_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="one two three four five six seven " * 12, max_tokens=2)
    assert "max_model_len=64, the encoder's limit" in str(err.value)
    reply = client.completions.create(model=MODEL, prompt="describe", max_tokens=3)  # the server is fine
    assert reply.usage.completion_tokens <= 3


@pytest.fixture(scope="module")
def blip2_t5_dir(tmp_path_factory):
    return build_tiny_blip2_t5(tmp_path_factory.mktemp("blip2_t5_server"), seed=4)


@pytest.fixture(scope="module")
def blip2_t5_client(blip2_t5_dir, tmp_path_factory):
    proc = ServerProcess(blip2_t5_dir, "--served-model-name", MODEL, "--dtype", "float32",
                         log_dir=tmp_path_factory.mktemp("blip2_t5_server_log"))
    yield openai.OpenAI(base_url=proc.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    proc.stop()


def test_blip2_t5_chat_and_beam_search_equal_offline(blip2_t5_client, blip2_t5_dir):
    image = random_image(7, 50, 40)
    question = "what is in the picture?"
    reply = blip2_t5_client.chat.completions.create(
        model=MODEL, temperature=0.0, max_tokens=8, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                               {"type": "text", "text": question}]}])
    llm = LLM(str(blip2_t5_dir), dtype="float32", num_threads=1)
    offline = llm.chat([{"role": "user", "content": [{"type": "image_pil", "image_pil": image},
                                                     {"type": "text", "text": question}]}],
                       SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    assert offline.prompt == f"Question: {question} Answer:</s>"
    assert reply.choices[0].message.content == offline.outputs[0].text
    assert reply.usage.prompt_tokens == len(offline.prompt_token_ids)
    assert reply.usage.completion_tokens == 8

    prompt = {"prompt": f"Question: {question} Answer:", "multi_modal_data": {"image": image}}
    beams = llm.beam_search([prompt], BeamSearchParams(beam_width=3, max_tokens=6))[0]
    reply = blip2_t5_client.chat.completions.create(
        model=MODEL, max_tokens=6, n=3, extra_body={"use_beam_search": True},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                               {"type": "text", "text": question}]}])
    assert [c.message.content for c in reply.choices] == [s.text for s in beams.sequences]
    assert len({s.text for s in beams.sequences}) > 1

"""Chat with a checkpoint that ships no chat template (a tiny BLIP-2, as Salesforce's are): `fovea serve` renders
it with fovea's fallback for the model type (logged at start-up), so /v1/chat/completions answers exactly what
`LLM.generate` answers on BLIP-2's "Question: {text} Answer:" prompt; `--chat-template` replaces the fallback; and
a model with neither is refused in the HTTP client's terms (the server's flag, never a Python call)."""
from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
import uvicorn

from fovea import LLM, SamplingParams
from fovea.config import EngineConfig
from fovea.engine.async_engine import AsyncLLMEngine
from fovea.engine.llm_engine import LLMEngine
from fovea.entrypoints import chat_templates
from fovea.entrypoints.chat_templates import CHAT_TEMPLATES_DIR
from fovea.entrypoints.openai.app import ServerSettings, build_app
from tests.entrypoints import ServerProcess, data_url, free_port, random_image
from tests.entrypoints import restore_torch_threads  # noqa: F401 (an autouse fixture)
from tests.oracle.blip2 import build_tiny_blip2

IMAGE = random_image(3, 50, 40)
QUESTION = "what is in the picture?"
# what a BLIP-2 user writes for generate() (Blip2Processor adds the BOS in front)
BLIP2_PROMPT = f"Question: {QUESTION} Answer:"
# a custom template for --chat-template: the text alone, after BOS
CUSTOM_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% for part in m['content'] %}"
                   "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endfor %}")
PARAMS = SamplingParams(temperature=0.0, max_tokens=12, logprobs=1, ignore_eos=True)


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    path = build_tiny_blip2(tmp_path_factory.mktemp("blip_fallback"), seed=0)
    assert not list(path.glob("chat_template*")), "the test checkpoint must have no chat template"
    return path


@pytest.fixture(scope="module")
def llm(blip_dir):
    llm = LLM(str(blip_dir), dtype="float32", num_kv_blocks=64, num_threads=1)
    assert not llm.get_tokenizer().chat_template
    return llm


def messages(text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(IMAGE)}},
                                         {"type": "text", "text": text}]}]


def chat(server: ServerProcess, text: str = QUESTION):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    return client.chat.completions.create(model=client.models.list().data[0].id, messages=messages(text),
                                          temperature=0.0, max_tokens=PARAMS.max_tokens, logprobs=True,
                                          extra_body={"ignore_eos": True})


def assert_reply_is(reply, expected) -> None:
    """The server's reply is `expected` (an offline RequestOutput): same prompt length, text and logprobs."""
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert reply.choices[0].message.content == expected.outputs[0].text
    completion = expected.outputs[0]
    assert len(reply.choices[0].logprobs.content) == len(completion.token_ids)
    for entry, token_id, offline in zip(reply.choices[0].logprobs.content, completion.token_ids, completion.logprobs):
        assert entry.logprob == pytest.approx(offline[token_id].logprob, abs=1e-4)


def test_llm_chat_renders_the_blip2_fallback(llm):
    """The fallback renders BLIP-2's VQA prompt, BOS in front, and chat equals generate on it token for token."""
    chatted = llm.chat(messages(), PARAMS, use_tqdm=False)[0]
    assert chatted.prompt == "</s>" + BLIP2_PROMPT
    generated = llm.generate({"prompt": BLIP2_PROMPT, "multi_modal_data": {"image": IMAGE}}, PARAMS,
                             use_tqdm=False)[0]
    assert chatted.prompt_token_ids == generated.prompt_token_ids
    assert chatted.outputs[0].token_ids == generated.outputs[0].token_ids
    # a given template still wins over the fallback
    given = llm.chat(messages(), PARAMS, chat_template=CUSTOM_TEMPLATE, use_tqdm=False)[0]
    assert given.prompt == "</s>" + QUESTION


def test_the_server_chats_through_the_fallback_and_logs_it(blip_dir, llm, tmp_path):
    server = ServerProcess(blip_dir, "--num-kv-blocks", "64", log_dir=tmp_path)
    try:
        reply = chat(server)
        other = chat(server, "how many shapes are there?")
        log = server.log_tail()
    finally:
        server.stop()
    assert "chat template: the checkpoint has none; fovea's fallback for model type 'blip-2' " \
           "(template_blip2.jinja: <bos>Question: {text} Answer:)" in log
    expected = llm.generate({"prompt": BLIP2_PROMPT, "multi_modal_data": {"image": IMAGE}}, PARAMS, use_tqdm=False)[0]
    assert_reply_is(reply, expected)
    expected = llm.generate({"prompt": "Question: how many shapes are there? Answer:",
                             "multi_modal_data": {"image": IMAGE}}, PARAMS, use_tqdm=False)[0]
    assert_reply_is(other, expected)
    assert reply.choices[0].message.content != other.choices[0].message.content  # the prompt reached the model


def test_chat_template_flag_replaces_the_fallback(blip_dir, llm, tmp_path):
    template_file = tmp_path / "custom.jinja"
    template_file.write_text(CUSTOM_TEMPLATE)
    server = ServerProcess(blip_dir, "--num-kv-blocks", "64", "--chat-template", str(template_file), log_dir=tmp_path)
    try:
        reply = chat(server)
        log = server.log_tail()
    finally:
        server.stop()
    assert "chat template: the one given (--chat-template)" in log and "fallback" not in log
    expected = llm.generate({"prompt": QUESTION, "multi_modal_data": {"image": IMAGE}}, PARAMS, use_tqdm=False)[0]
    assert_reply_is(reply, expected)


def test_without_any_template_the_client_is_told_the_server_flag(blip_dir, monkeypatch):
    """No template in the checkpoint and no fallback for its model type: a 400 naming --chat-template and
    /v1/completions, never generate(); LLM.chat, a Python caller, is told its own argument and generate()."""
    monkeypatch.delitem(chat_templates.FALLBACK_TEMPLATES, "blip-2")
    engine = AsyncLLMEngine(LLMEngine(EngineConfig.from_kwargs(str(blip_dir), dtype="float32", num_kv_blocks=16,
                                                               num_threads=1)))
    app = build_app(engine, ServerSettings())
    assert app.state.chat_template.describe().startswith("chat template: none")
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not uv.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the in-process server did not start"
            time.sleep(0.05)
        response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30,
                              json={"messages": messages(), "max_tokens": 2})
    finally:
        uv.should_exit = True
        thread.join(timeout=60)
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "no chat template" in message and "'blip-2'" in message
    assert "--chat-template" in message and "/v1/completions" in message
    assert "generate" not in message and "chat_template=" not in message

    llm = LLM(str(blip_dir), dtype="float32", num_kv_blocks=16, num_threads=1)
    with pytest.raises(ValueError, match=r"no fallback for model type 'blip-2'\); pass chat_template=.*generate\(\)"):
        llm.chat(messages())


def test_fallback_templates_ship_as_package_data():
    """Every fallback is a file in the package (pyproject's package-data lists *.jinja) and renders a one-message
    chat as its summary says."""
    from tests.oracle.t5 import build_t5_tokenizer
    from tests.oracle.tokenizer import build_tokenizer

    opt, t5 = build_tokenizer(), build_t5_tokenizer()
    for tokenizer, templates in [(opt, chat_templates.FALLBACK_TEMPLATES),
                                 (t5, chat_templates.ENCODER_DECODER_FALLBACK_TEMPLATES)]:
        for model_type, fallback in templates.items():
            path = CHAT_TEMPLATES_DIR / fallback.file_name
            assert path.is_file(), model_type
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                                    {"type": "text", "text": "hi"}]}],
                                                     chat_template=path.read_text(), tokenize=False,
                                                     add_generation_prompt=True)
            # a summary is one log line: a newline the template renders is written "\\n" in it
            expected = fallback.summary.replace("{text}", "hi").replace("\\n", "\n")
            expected = expected.replace("<bos>", str(tokenizer.bos_token)).replace("<eos>", tokenizer.eos_token)
            assert rendered == expected
            if tokenizer is t5:  # what the T5 tokenizer itself gives the plain prompt (its </s> included)
                plain = expected.removesuffix(tokenizer.eos_token)
                assert tokenizer.encode(rendered, add_special_tokens=False) == tokenizer(plain).input_ids
    import tomllib

    from tests.entrypoints import ROOT

    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "*.jinja" in package_data["fovea.entrypoints.chat_templates"]

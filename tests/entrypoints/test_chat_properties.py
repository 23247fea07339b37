"""Properties of prompt building (`fovea.entrypoints.chat_utils`) and of the server's chat request parser
(`ChatCompletionRequest` -> `build_chat_prompt`), on any JSON a client can send.

Any input either works or raises ValueError (pydantic's ValidationError and the server's RequestError are
ValueErrors: the server answers them 400); never another exception. When it works, the prompt holds exactly one
image placeholder per image part, in order, the media list holds one item per media part, and the token ids are the
rendered text's.
"""
from __future__ import annotations

import base64
import io

import pytest
from hypothesis import event
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoTokenizer

from fovea.entrypoints.chat_utils import RESERVED_TEMPLATE_KWARGS, build_chat_prompt, parse_chat_messages
from fovea.entrypoints.openai import protocol as p
from tests.fuzzing import fuzz
from tests.oracle.qwen2_5_vl import build_tiny_qwen2_5_vl


def png_data_url(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


IMAGE_URL = png_data_url(3, 2)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=12)
openai_roles = st.sampled_from(["system", "developer", "user", "assistant", "tool"])
roles = openai_roles | st.text(max_size=8)
urls = st.sampled_from([IMAGE_URL, "data:video/mp4;base64,AAAA", "data:image/png;base64,", "file:///etc/passwd",
                        "/etc/passwd", "http://127.0.0.1/x.png", "ftp://host/x", "data:,", "", "x"])
text_parts = st.builds(lambda text: {"type": "text", "text": text},
                       st.text(max_size=30) | st.sampled_from(["<|image_pad|>", "<|im_end|>", "{{ 1 }}"]))
image_parts = st.builds(lambda url: {"type": "image_url", "image_url": {"url": url}}, urls | st.just(IMAGE_URL))
video_parts = st.builds(lambda url: {"type": "video_url", "video_url": {"url": url}}, urls)
any_parts = st.dictionaries(st.sampled_from(["type", "text", "image_url", "input_audio"]), json_values, max_size=3)
parts = st.one_of(text_parts, text_parts, image_parts, video_parts, any_parts)
contents = st.one_of(st.text(max_size=40), st.lists(parts, max_size=4), st.none(), json_values)
# two in three conversations are well formed (OpenAI's roles, text and image parts) so that most reach the template
good_messages = st.lists(st.fixed_dictionaries(
    {"role": openai_roles, "content": st.text(max_size=20) | st.lists(text_parts | image_parts, max_size=3)}),
    min_size=1, max_size=4)
any_messages = st.lists(st.fixed_dictionaries({"role": roles, "content": contents},
                                              optional={"name": st.text(max_size=5),
                                                        "tool_call_id": st.text(max_size=5), "extra": json_values}),
                        min_size=0, max_size=4)
messages = st.one_of(good_messages, good_messages, any_messages)
template_kwargs = st.none() | st.dictionaries(
    st.sampled_from(["add_vision_id", "self", "messages", "conversation", "tools", "kwargs", "enable_thinking"])
    | st.text(max_size=6), json_values, max_size=3)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The tiny Qwen2.5-VL checkpoint's tokenizer: its chat template puts one <|image_pad|> per image."""
    return AutoTokenizer.from_pretrained(build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("chat_props"), seed=0))


def check_prompt(tokenizer, messages_value, **kwargs) -> None:
    """build_chat_prompt works with the right counts, or raises ValueError."""
    try:
        chat = build_chat_prompt(tokenizer, messages_value, allowed_modalities={"image", "video"}, **kwargs)
    except ValueError as err:
        event(f"refused: {str(err)[:25]}")
        return
    event("built")
    contents = [m.get("content") for m in messages_value]
    part_lists = [c for c in contents if isinstance(c, list)]
    num_images = sum(1 for c in part_lists for part in c if part["type"] == "image_url")
    num_videos = sum(1 for c in part_lists for part in c if part["type"] == "video_url")
    mm_data = chat.prompt.get("multi_modal_data", {})
    assert len(mm_data.get("image", [])) == num_images and len(mm_data.get("video", [])) == num_videos
    ids = chat.prompt["prompt_token_ids"]
    assert ids == tokenizer.encode(chat.text, add_special_tokens=False)
    image_pad, video_pad = tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"])
    # a client's text that spells a placeholder token is encoded as that token, as in vLLM and transformers'
    # default (the engine then refuses a prompt whose placeholders do not match its media)
    texts = [c for c in contents if isinstance(c, str)]
    texts += [part["text"] for c in part_lists for part in c if part["type"] == "text"]
    assert ids.count(image_pad) == num_images + sum(t.count("<|image_pad|>") for t in texts)
    assert ids.count(video_pad) == num_videos + sum(t.count("<|video_pad|>") for t in texts)


@fuzz(150, value=json_values | messages)
def test_any_json_is_parsed_or_a_value_error(value):
    try:
        conversation, mm_data = parse_chat_messages(value, allowed_modalities={"image"})
    except ValueError:
        return
    assert len(conversation) == len(value)
    assert all(isinstance(m["content"], (str, list)) for m in conversation)
    assert set(mm_data) <= {"image"}


@fuzz(80, value=messages, kwargs=template_kwargs, add_generation_prompt=st.booleans())
def test_any_messages_build_a_prompt_with_one_placeholder_per_image_or_a_value_error(tokenizer, value, kwargs,
                                                                                       add_generation_prompt):
    check_prompt(tokenizer, value, chat_template_kwargs=kwargs, add_generation_prompt=add_generation_prompt)


@fuzz(80, body=st.fixed_dictionaries({"messages": messages | json_values}, optional={
    "chat_template_kwargs": template_kwargs, "add_generation_prompt": json_values, "temperature": json_values,
    "max_tokens": json_values, "n": json_values, "stop": json_values, "logprobs": json_values,
    "top_logprobs": json_values, "response_format": json_values, "tools": json_values}))
def test_the_servers_chat_parser_takes_any_body_or_raises_value_error(tokenizer, body):
    """What /v1/chat/completions runs before the engine: pydantic, the sampling checks, then the prompt."""
    try:
        request = p.ChatCompletionRequest.model_validate(body)
        request.to_sampling_params()
    except ValueError as err:  # a ValidationError or a RequestError: the server's 400
        event(f"refused: {type(err).__name__}")
        return
    check_prompt(tokenizer, request.message_dicts(), chat_template_kwargs=request.chat_template_kwargs,
                 add_generation_prompt=request.add_generation_prompt)


def test_reserved_template_kwargs_cover_every_argument_of_apply_chat_template(tokenizer):
    """A chat_template_kwargs key that is one of apply_chat_template's own parameters would be passed twice (a
    TypeError, so a 500) or change how it renders; each must be refused as a ValueError naming it."""
    import inspect

    parameters = set(inspect.signature(type(tokenizer).apply_chat_template).parameters) - {"kwargs"}
    assert parameters <= RESERVED_TEMPLATE_KWARGS, sorted(parameters - RESERVED_TEMPLATE_KWARGS)

"""OpenAI-style messages -> transformers' content parts + media in order, rendered with the chat template;
and `LLM.chat` on a checkpoint without a template (BLIP-2: fovea's fallback, or the one given)."""
from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from fovea import LLM, SamplingParams
from fovea.entrypoints.chat_utils import build_chat_prompt, parse_chat_messages, render_chat
from tests.e2e.blip2_cases import make_image
from tests.oracle.blip2 import build_tiny_blip2
from tests.oracle.qwen2_5_vl import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, build_qwen_tokenizer

BOTH = {"image", "video"}


def data_url(img: Image.Image) -> str:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture(scope="module")
def tokenizer():
    return build_qwen_tokenizer()


def test_parts_become_template_parts_and_media_keep_their_order(tmp_path):
    pil = Image.new("RGB", (4, 4))
    url = data_url(pil)
    path = tmp_path / "a.png"
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "name": "ann", "content": [
            {"type": "text", "text": "Compare"}, image_part(url), {"type": "image_pil", "image_pil": pil},
            {"type": "video_url", "video_url": {"url": "file://" + str(tmp_path / "clip.mp4")}},
            {"type": "image_url", "image_url": str(path)},  # the bare-string form some clients send
        ]},
        {"role": "assistant", "content": None},
    ]
    conversation, mm_data = parse_chat_messages(messages, allowed_modalities=BOTH, allow_local_paths=True)
    assert conversation == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "name": "ann", "content": [{"type": "text", "text": "Compare"}, {"type": "image"},
                                                    {"type": "image"}, {"type": "video"}, {"type": "image"}]},
        {"role": "assistant", "content": ""},
    ]
    assert mm_data == {"image": [url, pil, str(path)], "video": [str(tmp_path / "clip.mp4")]}
    assert mm_data["image"][1] is pil
    assert messages[1]["content"][1] == image_part(url)  # the caller's messages are left alone


def test_remote_urls_go_to_fetch_and_local_paths_need_permission(tmp_path):
    messages = [{"role": "user", "content": [image_part("https://example.com/cat.png")]}]
    with pytest.raises(ValueError, match="remote URLs are not fetched here"):
        parse_chat_messages(messages, allowed_modalities=BOTH)
    fetched = []
    _, mm_data = parse_chat_messages(messages, allowed_modalities=BOTH,
                                     fetch=lambda url: fetched.append(url) or b"bytes")
    assert fetched == ["https://example.com/cat.png"] and mm_data == {"image": [b"bytes"]}
    for url in (str(tmp_path / "a.png"), "file:///tmp/a.png", "relative/a.png"):
        with pytest.raises(ValueError, match="local files are not read here"):
            parse_chat_messages([{"role": "user", "content": [image_part(url)]}], allowed_modalities=BOTH)
    with pytest.raises(ValueError, match="names a host"):
        parse_chat_messages([{"role": "user", "content": [image_part("file://server/a.png")]}],
                            allowed_modalities=BOTH, allow_local_paths=True)
    with pytest.raises(ValueError, match="unsupported URL scheme 'ftp'"):
        parse_chat_messages([{"role": "user", "content": [image_part("ftp://x/a.png")]}], allowed_modalities=BOTH)


@pytest.mark.parametrize("messages, needle", [
    ("hello", "messages must be a list"),
    ([], "messages is empty"),
    (["hi"], "message 0 must be a dict"),
    ([{"content": "hi"}], "message 0 needs a 'role'"),
    ([{"role": "user", "content": 3}], "message 0: content must be a str or a list"),
    ([{"role": "user", "content": ["hi"]}], "message 0, content part 0: a content part is a dict"),
    ([{"role": "user", "content": "ok"}, {"role": "user", "content": [{"type": "audio_url"}]}],
     r"message 1, content part 0: unknown content part type 'audio_url'; valid types: text, image_url"),
    ([{"role": "user", "content": [{"type": "text", "text": None}]}], "needs 'text' as a str"),
    ([{"role": "user", "content": [{"type": "image_pil", "image_pil": "x.png"}]}], "PIL.Image.Image"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], r"needs 'image_url': \{'url': str\}"),
    ([{"role": "user", "content": [image_part("data:video/mp4;base64,AAAA")]}], "media type 'image/...'"),
    ([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:image/png;base64,AA"}}]}],
     "media type 'video/...'"),
])
def test_malformed_messages_name_the_message_and_part(messages, needle):
    with pytest.raises(ValueError, match=needle):
        parse_chat_messages(messages, allowed_modalities=BOTH)


def test_modalities_the_model_does_not_take():
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,A"}}]}]
    with pytest.raises(ValueError, match="does not take video input; modalities it takes: image"):
        parse_chat_messages(messages, allowed_modalities={"image"})
    with pytest.raises(ValueError, match=r"does not take image input; modalities it takes: none \(text only\)"):
        parse_chat_messages([{"role": "user", "content": [{"type": "image_pil", "image_pil": Image.new("L", (2, 2))}]}],
                            allowed_modalities=())


def test_render_with_the_checkpoint_template(tokenizer):
    conversation, _ = parse_chat_messages(
        [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,A"}},
                                      {"type": "text", "text": "and"}, image_part("data:image/png;base64,A")]}],
        allowed_modalities=BOTH)
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    user = f"<|im_start|>user\n{VIDEO_PLACEHOLDER}and{IMAGE_PLACEHOLDER}<|im_end|>\n"
    assert render_chat(tokenizer, conversation) == system + user + "<|im_start|>assistant\n"
    assert render_chat(tokenizer, conversation, add_generation_prompt=False) == system + user
    custom = "{% for m in messages %}[{{ m['role'] }}{{ suffix }}]{% endfor %}"
    assert render_chat(tokenizer, conversation, custom, chat_template_kwargs={"suffix": "!"}) == "[user!]"


def test_render_errors_are_value_errors(tokenizer):
    conversation = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="failed to render"):
        render_chat(tokenizer, conversation, "{{ raise_exception('no users here') }}")
    with pytest.raises(ValueError, match="failed to render"):
        render_chat(tokenizer, conversation, "{% for %}")
    bare = build_qwen_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template to render the messages with"):
        render_chat(bare, conversation)


def test_build_chat_prompt_is_parse_render_encode(tokenizer, tmp_path):
    pil = Image.new("RGB", (4, 4))
    url = data_url(pil)
    messages = [{"role": "user", "content": [image_part(url), {"type": "image_pil", "image_pil": pil},
                                             {"type": "text", "text": "Hi"}]}]
    chat = build_chat_prompt(tokenizer, messages, allowed_modalities=BOTH, mm_processor_kwargs={"max_pixels": 3136})
    conversation, _ = parse_chat_messages(messages, allowed_modalities=BOTH)
    assert chat.text == render_chat(tokenizer, conversation)
    assert chat.prompt == {"prompt_token_ids": tokenizer.encode(chat.text, add_special_tokens=False),
                           "multi_modal_data": {"image": [url, pil]}, "mm_processor_kwargs": {"max_pixels": 3136}}
    # read_media takes the strings the parser passed through (the server reads them under its limits), not objects
    read = build_chat_prompt(tokenizer, messages, allowed_modalities=BOTH, read_media=lambda item: item[:10].encode())
    assert read.prompt["multi_modal_data"] == {"image": [url[:10].encode(), pil]}
    text_only = build_chat_prompt(tokenizer, [{"role": "user", "content": "Hi"}], allowed_modalities=BOTH)
    assert set(text_only.prompt) == {"prompt_token_ids"}
    with pytest.raises(ValueError, match="chat_template_kwargs may not set add_generation_prompt, tokenize"):
        build_chat_prompt(tokenizer, messages, allowed_modalities=BOTH,
                          chat_template_kwargs={"tokenize": True, "add_generation_prompt": False, "x": 1})


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    path = build_tiny_blip2(tmp_path_factory.mktemp("blip2_chat"), seed=0)
    return LLM(path, dtype="float32", block_size=4, max_model_len=64)


def test_chat_on_a_checkpoint_without_template(blip2):
    """BLIP-2 ships no template: fovea's fallback (BLIP-2's VQA prompt) unless one is given; with one given, chat
    equals generate on the rendered text (the template writes the BOS token, as chat templates do, and chat adds
    no special tokens of its own). A system message has no place in BLIP-2's prompt: an error, not dropped."""
    messages = [{"role": "user", "content": [{"type": "image_pil", "image_pil": make_image(3, (40, 30))},
                                             {"type": "text", "text": "a photo of"}]}]
    assert blip2.chat(messages, SamplingParams(max_tokens=1), use_tqdm=False)[0].prompt == \
        "</s>Question: a photo of Answer:"
    with pytest.raises(ValueError, match="roles 'user' and 'assistant', not 'system'"):
        blip2.chat([{"role": "system", "content": "Be brief."}, *messages])
    template = ("{{ bos_token }}{% for m in messages %}{% for part in m['content'] %}"
                "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endfor %}")
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    chatted = blip2.chat(messages, params, chat_template=template, use_tqdm=False)[0]
    assert chatted.prompt == "</s>a photo of"
    generated = blip2.generate({"prompt": "a photo of", "multi_modal_data": {"image": make_image(3, (40, 30))}},
                               params, use_tqdm=False)[0]
    assert chatted.prompt_token_ids == generated.prompt_token_ids
    assert chatted.outputs[0].token_ids == generated.outputs[0].token_ids


def test_chat_names_the_bad_conversation_and_stays_usable(blip2):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    good = [{"role": "user", "content": "a photo of"}]
    bad = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,A"}}]}]
    with pytest.raises(ValueError, match="conversation 1: message 0, content part 0: this model does not take video"):
        blip2.chat([good, bad], chat_template=template, use_tqdm=False)
    assert not blip2.llm_engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="messages must be a list"):
        blip2.chat("a photo of", chat_template=template)
    outs = blip2.chat([good, good], SamplingParams(max_tokens=2, ignore_eos=True), chat_template=template,
                      use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 2]

"""OpenAI-style chat messages -> the checkpoint's chat template + the media they carry.

Shared by `LLM.chat` and the OpenAI server, so nothing here knows about the engine: a message list goes in,
a conversation in transformers' content-part format (what `tokenizer.apply_chat_template` renders) and the
media in prompt order come out.

    chat = build_chat_prompt(tokenizer, messages, allowed_modalities={"image", "video"})
    chat.prompt  # {"prompt_token_ids": [...], "multi_modal_data": {"image": [...]}}: an engine prompt
    chat.text    # the rendered template, special tokens included

`build_chat_prompt` is the one way from messages to an engine prompt; `parse_chat_messages` and `render_chat` are
its two steps.

Content is a str or a list of parts:

    {"type": "text", "text": "..."}
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,..." | "file:///a.png" | "/a.png" | "https://..."}}
    {"type": "video_url", "video_url": {"url": ...}}
    {"type": "image_pil", "image_pil": PIL.Image.Image}

Media parts become {"type": "image"} / {"type": "video"} (the templates put the model's placeholder there);
`mm_data` holds the items as `load_image` / `load_video` take them (a data URL, a path, fetched bytes, a PIL
image), decoded later by the engine. http(s) URLs go to a `fetch` callable (the server's, with its timeouts
and size limits); local paths are read only when `allow_local_paths` is set, since a server must not open
files a client names.
"""
from __future__ import annotations

import re
import urllib.parse
import urllib.request
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

ChatMessage = Mapping[str, Any]
Fetch = Callable[[str], Any]

_PART_TYPES = ("text", "image_url", "video_url", "image_pil")
_URL_PARTS = {"image_url": "image", "video_url": "video"}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_MAX_SHOWN_CHARS = 80
# apply_chat_template's own arguments: chat_template_kwargs must not override the template or how it is rendered
RESERVED_TEMPLATE_KWARGS = frozenset({
    "chat_template", "conversation", "tokenize", "add_generation_prompt", "continue_final_message", "tools",
    "documents", "return_dict", "return_tensors", "return_assistant_tokens_mask", "padding", "truncation",
    "max_length", "tokenizer_kwargs", "processor_kwargs", "sanitize_control_tokens",
    "self", "conversations", "messages",  # passed twice otherwise (to the method, the renderer, the template)
})


@dataclass(slots=True)
class ChatPrompt:
    """One conversation made ready for the engine."""

    text: str  # the rendered template, special tokens included
    prompt: dict[str, Any]  # {"prompt_token_ids", and "multi_modal_data" / "mm_processor_kwargs" when given}


def no_fetch(url: str) -> Any:
    """The default `fetch`: remote media is refused."""
    raise ValueError(f"remote URLs are not fetched here: {_shorten(url)}; pass the media as a data URL or a "
                     f"file path")


def build_chat_prompt(
    tokenizer: Any,
    messages: Sequence[ChatMessage],
    *,
    allowed_modalities: Collection[str],
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    mm_processor_kwargs: Mapping[str, Any] | None = None,
    fetch: Fetch = no_fetch,
    allow_local_paths: bool = False,
    read_media: Callable[[str], Any] | None = None,
) -> ChatPrompt:
    """OpenAI-style messages -> an engine prompt: what `LLM.chat` and the server's /v1/chat/completions both run.

    The messages are parsed (`parse_chat_messages`, which takes `fetch` and `allow_local_paths`), rendered with
    `chat_template` or the tokenizer's own, and tokenized without adding special tokens (the template has them,
    as in vLLM). `read_media(item)`, when given, replaces every media string the parser passed through (a data
    URL, a local path) with what it returns: the server reads them itself, under its size limits, while
    `LLM.chat` leaves them to the engine's loaders. Every problem is a ValueError.
    """
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(chat_template_kwargs or {}))
    if reserved:
        raise ValueError(f"chat_template_kwargs may not set {', '.join(reserved)} (arguments of the rendering "
                         f"itself)")
    conversation, mm_data = parse_chat_messages(messages, allowed_modalities=allowed_modalities, fetch=fetch,
                                                allow_local_paths=allow_local_paths)
    if read_media is not None:
        mm_data = {modality: [read_media(item) if isinstance(item, str) else item for item in items]
                   for modality, items in mm_data.items()}
    text = render_chat(tokenizer, conversation, chat_template, add_generation_prompt,
                       chat_template_kwargs=chat_template_kwargs)
    prompt: dict[str, Any] = {"prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}
    if mm_data:
        prompt["multi_modal_data"] = mm_data
    if mm_processor_kwargs:
        prompt["mm_processor_kwargs"] = dict(mm_processor_kwargs)
    return ChatPrompt(text, prompt)


def parse_chat_messages(
    messages: Sequence[ChatMessage],
    *,
    allowed_modalities: Collection[str],
    fetch: Fetch = no_fetch,
    allow_local_paths: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, list[Any]]]:
    """Validate OpenAI-style messages; return (conversation for the chat template, {"image": [...], ...}).

    `allowed_modalities`: what the model takes (a part of another modality is an error naming them).
    `fetch(url)` is called for http(s) URLs and returns what the loaders take (bytes, usually).
    `allow_local_paths`: whether a plain path or file:// URL may be read (LLM.chat: yes; a server: no).
    Keys of a message other than `content` (role, name, tool_calls, ...) are passed to the template as given.
    Every problem is a ValueError naming the message and part.
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got "
                         f"{type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty; give at least one message")
    conversation: list[dict[str, Any]] = []
    mm_data: dict[str, list[Any]] = {}
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"message {i} needs a 'role' string (system, user, assistant, ...), got {role!r}")
        content = message.get("content")
        parsed = dict(message)
        if content is None or isinstance(content, str):
            parsed["content"] = content or ""
        elif isinstance(content, Sequence) and not isinstance(content, (bytes, Mapping)):
            parts = []
            for j, part in enumerate(content):
                try:
                    parts.append(_parse_part(part, allowed_modalities, fetch, allow_local_paths, mm_data))
                except ValueError as e:
                    raise ValueError(f"message {i}, content part {j}: {e}") from e
            parsed["content"] = parts
        else:
            raise ValueError(f"message {i}: content must be a str or a list of parts, got {type(content).__name__}")
        conversation.append(parsed)
    return conversation, mm_data


def render_chat(
    tokenizer: Any,
    conversation: Sequence[ChatMessage],
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    *,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """The conversation rendered by `chat_template`, or else the tokenizer's own, as a prompt string.

    The string holds the template's special tokens already: tokenize it with `add_special_tokens=False`.
    `chat_template_kwargs` are extra variables for the template (e.g. Qwen's `add_vision_id`).
    """
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        # callers resolve the template first (`resolve_chat_template`) and refuse in their own terms; this is the
        # last guard, so it names no API
        raise ValueError("no chat template to render the messages with: the tokenizer has none and none was given")
    import jinja2  # transformers renders templates with jinja2

    try:
        rendered = tokenizer.apply_chat_template(list(conversation), chat_template=chat_template,
                                                 add_generation_prompt=add_generation_prompt, tokenize=False,
                                                 **dict(chat_template_kwargs or {}))
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template failed to render the messages: {e}") from e
    except (TypeError, AttributeError, KeyError, IndexError, ArithmeticError) as e:
        # Jinja lets Python's own errors through: a template iterating a value the client set to null
        raise ValueError(f"the chat template failed to render the messages: {type(e).__name__}: {e}") from e
    if not isinstance(rendered, str):
        raise ValueError(f"the chat template rendered to {type(rendered).__name__}, not a str")
    return rendered


def _parse_part(part: Any, allowed_modalities: Collection[str], fetch: Fetch, allow_local_paths: bool,
                mm_data: dict[str, list[Any]]) -> dict[str, Any]:
    if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
        raise ValueError(f"a content part is a dict with a 'type' ({', '.join(_PART_TYPES)}), got {part!r:.80}")
    kind = part["type"]
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"a text part needs 'text' as a str, got {type(text).__name__}")
        return {"type": "text", "text": text}
    if kind == "image_pil":
        image = part.get("image_pil")
        if not isinstance(image, Image.Image):
            raise ValueError(f"an image_pil part needs 'image_pil' as a PIL.Image.Image, got {type(image).__name__}")
        return _add_media("image", image, allowed_modalities, mm_data)
    if kind in _URL_PARTS:
        modality = _URL_PARTS[kind]
        _check_modality(modality, allowed_modalities)
        value = part.get(kind)
        url = value.get("url") if isinstance(value, Mapping) else value
        if not isinstance(url, str) or not url:
            raise ValueError(f"a {kind} part needs {kind!r}: {{'url': str}}, got {value!r:.80}")
        return _add_media(modality, _resolve_url(url, modality, fetch, allow_local_paths), allowed_modalities,
                          mm_data)
    raise ValueError(f"unknown content part type {kind!r}; valid types: {', '.join(_PART_TYPES)}")


def _check_modality(modality: str, allowed_modalities: Collection[str]) -> None:
    if modality not in allowed_modalities:
        allowed = ", ".join(sorted(allowed_modalities)) or "none (text only)"
        raise ValueError(f"this model does not take {modality} input; modalities it takes: {allowed}")


def _add_media(modality: str, item: Any, allowed_modalities: Collection[str],
               mm_data: dict[str, list[Any]]) -> dict[str, Any]:
    _check_modality(modality, allowed_modalities)
    mm_data.setdefault(modality, []).append(item)
    return {"type": modality}


def _resolve_url(url: str, modality: str, fetch: Fetch, allow_local_paths: bool) -> Any:
    """What the loaders take for `url`: a data URL as it is, fetched content, or a local path."""
    match = _SCHEME.match(url)
    scheme = match.group(1).lower() if match else ""
    if scheme == "data":
        media_type = url[len("data:"):].split(",", 1)[0].split(";", 1)[0].strip().lower()
        if not media_type.startswith(f"{modality}/"):
            raise ValueError(f"a {modality} data URL must have media type '{modality}/...', got {media_type!r}")
        return url
    if scheme in ("http", "https"):
        return fetch(url)
    if scheme == "file":
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file URL {_shorten(url)} names a host; only local files are read")
        path = urllib.request.url2pathname(parts.path)
    elif scheme and url[len(scheme) + 1:].startswith("//"):
        raise ValueError(f"unsupported URL scheme {scheme!r} in {_shorten(url)}; use data:, file://, a path, or "
                         f"http(s) where the caller fetches")
    else:
        path = url
    if not allow_local_paths:
        raise ValueError(f"local files are not read here: {_shorten(url)}; send the {modality} as a data URL")
    return path


def _shorten(text: str) -> str:
    return repr(text) if len(text) <= _MAX_SHOWN_CHARS else repr(text[:_MAX_SHOWN_CHARS]) + f"... ({len(text)} chars)"

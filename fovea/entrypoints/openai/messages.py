"""Chat messages and their content parts as the server accepts them: typed, so `/openapi.json` states them.

A message is a union discriminated by `role` (OpenAI's roles: system, developer, user, assistant, tool); a part
is a union discriminated by `type`:

    {"type": "text", "text": "..."}                                       every role
    {"type": "image_url", "image_url": {"url": "data:image/...", "detail": "auto"}}   user only
    {"type": "video_url", "video_url": {"url": "data:video/..."}}                      user only

Anything else (an `input_audio` part, an unknown role, an image in a system message) is a 400 naming the
message and the part. Media URLs are strings here; what they may point at (data URLs; http(s) within
--allowed-media-domains; files under --allowed-local-media-path) and whether the model takes that modality is
checked when the prompt is built (`fovea.entrypoints.chat_utils`), also as a 400.

Keys OpenAI has that fovea does not use (`tool_calls`, `audio`, `refusal`, ...) are dropped, as are unknown
ones: only the declared fields reach the chat template. `LLM.chat` takes plain dicts and passes every key on.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # JSON types as the schema states them


class ImageURL(_Model):
    url: str = Field(min_length=1, description="a data:image/...;base64 URL, an http(s) URL the server may fetch, "
                                               "or a file:// URL under --allowed-local-media-path")
    detail: Literal["auto", "low", "high"] | None = Field(None, description="accepted and ignored (OpenAI's)")


class VideoURL(_Model):
    url: str = Field(min_length=1, description="a data:video/...;base64 URL, an http(s) URL the server may fetch, "
                                               "or a file:// URL under --allowed-local-media-path")


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImageURLPart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURLPart(_Model):
    type: Literal["video_url"]
    video_url: VideoURL


UserContentPart = Annotated[Union[TextPart, ImageURLPart, VideoURLPart], Field(discriminator="type")]


class SystemMessage(_Model):
    role: Literal["system"]
    content: str | list[TextPart]
    name: str | None = None


class DeveloperMessage(_Model):
    role: Literal["developer"]
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(_Model):
    role: Literal["user"]
    content: str | list[UserContentPart]
    name: str | None = None


class AssistantMessage(_Model):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None  # OpenAI: None when the turn held only tool calls
    name: str | None = None


class ToolMessage(_Model):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str


ChatMessageParam = Annotated[Union[SystemMessage, DeveloperMessage, UserMessage, AssistantMessage, ToolMessage],
                             Field(discriminator="role")]


def message_dicts(messages: list[ChatMessageParam]) -> list[dict[str, Any]]:
    """The messages as `build_chat_prompt` takes them: plain dicts, unset optional fields left out."""
    return [m.model_dump(exclude_none=True) for m in messages]

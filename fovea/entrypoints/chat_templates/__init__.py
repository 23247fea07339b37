"""Which chat template a model is chatted with: the one given, else the checkpoint's, else fovea's fallback.

Some architectures' checkpoints ship no chat template (BLIP-2, InstructBLIP, Fuyu), so their chat would be refused; as
vLLM does, fovea ships a fallback template for each such model type (the .jinja files next to this module, keyed
by config.json's `model_type`). A fallback is used only when nothing better is there:

    1. the template given (`fovea serve --chat-template`, `LLM.chat(chat_template=...)`);
    2. the checkpoint's own (the tokenizer's `chat_template`: chat_template.jinja or tokenizer_config.json);
    3. fovea's fallback for the model type;
    4. none: chat is refused, and the caller says how to give one in its own terms (a server flag, an argument).

    resolved = resolve_chat_template(tokenizer, hf_config.model_type, given)
    resolved.template  # the Jinja text, or None (step 4)
    resolved.describe()  # one line for the server's start-up log
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

CHAT_TEMPLATES_DIR = Path(__file__).parent


@dataclass(frozen=True, slots=True)
class FallbackTemplate:
    file_name: str  # in this folder
    summary: str  # what a one-message chat renders, for the start-up log


FALLBACK_TEMPLATES: dict[str, FallbackTemplate] = {
    "blip-2": FallbackTemplate("template_blip2.jinja", "<bos>Question: {text} Answer:"),  # BLIP-2's VQA prompt
    "fuyu": FallbackTemplate("template_fuyu.jinja", "{text}\\n"),  # each turn's text on its own line
    "instructblip": FallbackTemplate("template_instructblip.jinja", "<bos>{text}"),  # the instruction as written
}
"""config.json `model_type` -> fovea's fallback template."""

ENCODER_DECODER_FALLBACK_TEMPLATES: dict[str, FallbackTemplate] = {
    "blip-2": FallbackTemplate("template_blip2_t5.jinja", "Question: {text} Answer:<eos>"),
    "instructblip": FallbackTemplate("template_instructblip_t5.jinja", "{text}<eos>"),
}
"""The same, for checkpoints whose language model is an encoder-decoder (Flan-T5): T5's tokenizer adds no BOS but
closes every encoder input with `</s>`, so these render the same text as the ones above with no BOS in front and
the EOS at the end: what the processor gives for that prompt (a chat prompt is tokenized without special tokens)."""


class TemplateSource(Enum):
    GIVEN = "given"
    CHECKPOINT = "checkpoint"
    FALLBACK = "fallback"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class ResolvedChatTemplate:
    template: str | None  # the Jinja text; None: there is none (chat is refused)
    source: TemplateSource
    model_type: str
    fallback: FallbackTemplate | None = None

    def describe(self) -> str:
        """One line saying which template chats are rendered with, and why that one."""
        if self.source is TemplateSource.GIVEN:
            return "chat template: the one given (--chat-template)"
        if self.source is TemplateSource.CHECKPOINT:
            return "chat template: the checkpoint's own"
        if self.source is TemplateSource.FALLBACK:
            return (f"chat template: the checkpoint has none; fovea's fallback for model type {self.model_type!r} "
                    f"({self.fallback.file_name}: {self.fallback.summary})")
        return (f"chat template: none (the checkpoint has none and fovea has no fallback for model type "
                f"{self.model_type!r}); chat requests are refused")


def resolve_chat_template(tokenizer: Any, model_type: str, given: str | None = None, *,
                          is_encoder_decoder: bool = False) -> ResolvedChatTemplate:
    """The template chats with this model are rendered with (see the module's docstring for the order);
    `is_encoder_decoder` (`fovea.models.interfaces.is_encoder_decoder`) picks the encoder-decoder fallbacks."""
    if given is not None:
        return ResolvedChatTemplate(given, TemplateSource.GIVEN, model_type)
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # named templates (transformers allows several): "default" is the one chat uses
        own = own.get("default")
    if own:
        return ResolvedChatTemplate(own, TemplateSource.CHECKPOINT, model_type)
    fallback = (ENCODER_DECODER_FALLBACK_TEMPLATES if is_encoder_decoder else FALLBACK_TEMPLATES).get(model_type)
    if fallback is not None:
        text = (CHAT_TEMPLATES_DIR / fallback.file_name).read_text(encoding="utf-8")
        return ResolvedChatTemplate(text, TemplateSource.FALLBACK, model_type, fallback)
    return ResolvedChatTemplate(None, TemplateSource.NONE, model_type)


"""Hugging Face `architectures` names -> fovea model classes (imported only when resolved)."""
from __future__ import annotations

import importlib

from torch import nn

# architecture -> (module, class)
_MODELS: dict[str, tuple[str, str]] = {
    "Blip2ForConditionalGeneration": ("fovea.models.blip2", "Blip2ForConditionalGeneration"),
    "LlamaForCausalLM": ("fovea.models.llama", "LlamaForCausalLM"),
    "LlavaForConditionalGeneration": ("fovea.models.llava", "LlavaForConditionalGeneration"),
    "MistralForCausalLM": ("fovea.models.llama", "MistralForCausalLM"),
    "OPTForCausalLM": ("fovea.models.opt", "OPTForCausalLM"),
    "Qwen2_5_VLForConditionalGeneration": ("fovea.models.qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
    "Qwen2ForCausalLM": ("fovea.models.qwen2", "Qwen2ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def resolve_model_class(architectures: list[str] | None) -> type[nn.Module]:
    """The fovea class for the first supported name in config.json's `architectures`."""
    for arch in architectures or []:
        if arch in _MODELS:
            module_name, class_name = _MODELS[arch]
            return getattr(importlib.import_module(module_name), class_name)
    raise ValueError(
        f"unsupported model architecture(s) {list(architectures or [])}; supported: {supported_architectures()}"
    )

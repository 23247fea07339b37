"""Hugging Face `architectures` names -> fovea model classes (imported only when resolved)."""
from __future__ import annotations

import importlib

from torch import nn

# architecture -> (module, class)
_MODELS: dict[str, tuple[str, str]] = {
    "Blip2ForConditionalGeneration": ("fovea.models.blip2", "Blip2ForConditionalGeneration"),
    "FuyuForCausalLM": ("fovea.models.fuyu", "FuyuForCausalLM"),
    "InstructBlipForConditionalGeneration": ("fovea.models.instructblip", "InstructBlipForConditionalGeneration"),
    "LlamaForCausalLM": ("fovea.models.llama", "LlamaForCausalLM"),
    "LlavaForConditionalGeneration": ("fovea.models.llava", "LlavaForConditionalGeneration"),
    "LlavaNextForConditionalGeneration": ("fovea.models.llava_next", "LlavaNextForConditionalGeneration"),
    "MistralForCausalLM": ("fovea.models.llama", "MistralForCausalLM"),
    "OPTForCausalLM": ("fovea.models.opt", "OPTForCausalLM"),
    "PersimmonForCausalLM": ("fovea.models.persimmon", "PersimmonForCausalLM"),
    "Qwen2_5_VLForConditionalGeneration": ("fovea.models.qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
    "Qwen2ForCausalLM": ("fovea.models.qwen2", "Qwen2ForCausalLM"),
    "T5ForConditionalGeneration": ("fovea.models.t5", "T5ForConditionalGeneration"),
}


def register_model(architecture: str, model_cls: str) -> None:
    """Serve checkpoints whose config.json names `architecture` with `model_cls` ("package.module:ClassName",
    imported when resolved), as vLLM's `ModelRegistry.register_model`. Replaces an existing entry. The tests use
    it for a model that raises on purpose (tests/e2e/faulty_model.py)."""
    module_name, sep, class_name = model_cls.partition(":")
    if not sep or not module_name or not class_name:
        raise ValueError(f"model_cls must be 'package.module:ClassName', got {model_cls!r}")
    _MODELS[architecture] = (module_name, class_name)


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

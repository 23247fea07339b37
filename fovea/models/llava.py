"""LLaVA-1.5 (Liu et al. 2023): CLIP's vision tower, a two-layer projector, and a Llama-family LM.

What LLaVA adds over the shared parts (clip.py's tower, llama.py's LM, the merge of utils.py):
- an image is the tower's hidden states at `vision_feature_layer` (an int or a list concatenated along
  features), without the class token under `vision_feature_select_strategy="default"`;
- `multi_modal_projector`: linear_1 -> `projector_hidden_act` -> linear_2 (`multimodal_projector_bias`);
- the projected rows, one per placeholder, replace the `image_token_id` placeholders (llava_processing.py).

Parameter names follow the checkpoints transformers writes (`vision_tower.`, `multi_modal_projector.`,
`language_model.model.`, `language_model.lm_head.`); the transformers 5 module names (`model.vision_tower.`,
`model.language_model.`, `lm_head.`) and the released llava-hf names (`vision_tower.vision_model.`) load too.
"""
from __future__ import annotations

import torch
from torch import nn

from fovea.layers.activations import get_activation
from fovea.layers.linear import Linear
from fovea.models.clip import CLIPVisionTower
from fovea.models.interfaces import SupportsLoRA, SupportsMultiModal, SupportsQuant, SupportsTensorParallel
from fovea.models.llama import LLAMA_LORA_TARGET_MODULES, LlamaForCausalLM, MistralForCausalLM
from fovea.models.llava_processing import LlavaDummyInputsBuilder, LlavaMultiModalProcessor, LlavaProcessingInfo
from fovea.models.qwen2 import Qwen2ForCausalLM
from fovea.multimodal.registry import MULTIMODAL_REGISTRY

_LANGUAGE_MODELS = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM}
_VISION_MODEL_TYPES = ("clip_vision_model", "clip")

# (checkpoint prefix, fovea prefix): transformers 5 module names and older layouts onto the saved one
_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


class LlavaMultiModalProjector(nn.Module):
    def __init__(self, vision_width: int, text_hidden: int, act: str, bias: bool):
        super().__init__()
        self.linear_1 = Linear(vision_width, text_hidden, bias=bias)
        self.act = get_activation(act)
        self.linear_2 = Linear(text_hidden, text_hidden, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [B, T, Dv * layers] -> [B, T, hidden]
        return self.linear_2(self.act(self.linear_1(features)))


@MULTIMODAL_REGISTRY.register_processor(
    LlavaMultiModalProcessor, info=LlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class LlavaForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsQuant, SupportsLoRA,
                                    SupportsTensorParallel):
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    language_model_modules = ("language_model.model",)  # not the CLIP tower or the projector
    lm_head_module = "language_model.lm_head"
    lora_layers_prefix = "language_model.model.layers."  # the LM's decoder (Llama, Mistral or Qwen2), not CLIP's
    lora_target_modules = LLAMA_LORA_TARGET_MODULES

    def __init__(self, config):
        super().__init__()
        text_config, vision_config = config.text_config, config.vision_config
        if text_config.model_type not in _LANGUAGE_MODELS:
            raise ValueError(f"fovea's LLaVA runs {sorted(_LANGUAGE_MODELS)} language models, not "
                             f"{text_config.model_type!r}")
        if vision_config.model_type not in _VISION_MODEL_TYPES:
            raise ValueError(f"fovea's LLaVA runs a CLIP vision tower, not {vision_config.model_type!r}")
        self.config = config
        self.vision_tower = CLIPVisionTower(vision_config, config.vision_feature_layer,
                                            config.vision_feature_select_strategy)
        self.multi_modal_projector = LlavaMultiModalProjector(
            self.vision_tower.output_width, text_config.hidden_size, config.projector_hidden_act,
            bool(getattr(config, "multimodal_projector_bias", True)))
        self.language_model = _LANGUAGE_MODELS[text_config.model_type](text_config)
        self._skipped = tuple("vision_tower." + p for p in self.vision_tower.skipped_checkpoint_prefixes())

    def get_text_config(self):
        return self.config.text_config

    def rename_checkpoint_weight(self, name: str) -> str | None:
        for old, new in _PREFIXES:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        if name.startswith(self._skipped):
            return None  # post_layernorm and blocks past the deepest feature layer: never run
        prefix = "language_model."
        if name.startswith(prefix):
            inner = self.language_model.rename_checkpoint_weight(name[len(prefix):])
            return None if inner is None else prefix + inner
        return name

    def embed_multimodal(self, pixel_values: torch.Tensor | None = None,
                         image_embeds: torch.Tensor | None = None) -> list[torch.Tensor]:
        """One [num_image_tokens, hidden] tensor per image, from pixels [num_images, 3, S, S] or from
        pre-computed projector outputs `image_embeds` [num_images, num_image_tokens, hidden]."""
        if pixel_values is not None and image_embeds is not None:
            raise ValueError("give pixel_values or image_embeds, not both")
        if pixel_values is not None:
            projected = self.multi_modal_projector(self.vision_tower(pixel_values))  # (B, T, hidden)
        elif image_embeds is not None:
            expected = (self.vision_tower.num_output_tokens, self.config.text_config.hidden_size)
            if image_embeds.dim() != 3 or tuple(image_embeds.shape[1:]) != expected:
                raise ValueError(f"image_embeds must be [num_images, {expected[0]}, {expected[1]}], got "
                                 f"{list(image_embeds.shape)}")
            projected = image_embeds.to(self.multi_modal_projector.linear_2.params_dtype)
        else:
            return []
        return list(projected.unbind(0))

    def embed_input_ids(self, input_ids: torch.Tensor, mm_embeds: list[torch.Tensor] | None = None,
                        is_multimodal: torch.Tensor | None = None) -> torch.Tensor:
        return self.language_model.embed_input_ids(input_ids, mm_embeds, is_multimodal)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.language_model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden_states)

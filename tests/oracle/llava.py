"""Tiny random LLaVA-1.5 checkpoints (CLIP tower + projector + Llama/Mistral LM) built and run with transformers.

`build_tiny_llava` writes what `save_pretrained` writes for llava-hf/llava-1.5-7b-hf: config.json, safetensors,
a Llama-style tokenizer with an `<image>` token, a LLaVA-style chat template ("USER: <image>\\n... ASSISTANT:"),
and processor_config.json from transformers' own `LlavaProcessor` with a `CLIPImageProcessorPil`.
`hf_inputs` / `hf_reference` run transformers' processor and greedy `generate` at batch size 1.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessorPil,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from tests.oracle.llama import build_llama_tokenizer, hf_generate, llama_text_config, reinit_

IMAGE_TOKEN = "<image>"

# llava-hf's template, simplified: images first in each turn, then the text; string content is text. It starts
# with BOS, as Llama-2/3's templates do: fovea (like vLLM) tokenizes a rendered chat without adding special tokens,
# transformers' processor adds BOS unless the text starts with it, and this way both have one.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ (message['content'] if message['content'] is string else message['content'][0]['text']) + '\\n' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for part in message['content'] if part['type'] in ('image', 'image_url', 'image_pil') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def llava_prompt(text: str, num_images: int = 1) -> str:
    """What the chat template renders for one user turn with `num_images` images."""
    return "USER: " + f"{IMAGE_TOKEN}\n" * num_images + f"{text} ASSISTANT:"


def build_tiny_llava(
    out_dir: str | Path,
    *,
    seed: int = 0,
    image_size: int = 30,
    patch_size: int = 6,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    vision_heads: int = 4,
    vision_act: str = "quick_gelu",
    vision_feature_layer: int | list[int] = -2,
    vision_feature_select_strategy: str = "default",
    multimodal_projector_bias: bool = True,
    init_gain: float = 1.5,
    vision_init_gain: float = 1.0,
    text_kwargs: dict | None = None,
) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_llama_tokenizer(extra_special=(IMAGE_TOKEN,))
    tokenizer.chat_template = CHAT_TEMPLATE
    text_config = llama_text_config(tokenizer, **(text_kwargs or {}))
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=vision_hidden,
                           intermediate_size=2 * vision_hidden + 4, num_hidden_layers=vision_layers,
                           num_attention_heads=vision_heads, image_size=image_size, patch_size=patch_size,
                           hidden_act=vision_act, projection_dim=16),
        text_config=text_config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        multimodal_projector_bias=multimodal_projector_bias,
        image_seq_length=(image_size // patch_size) ** 2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    reinit_(model, seed, init_gain, vision_init_gain)
    model.save_pretrained(str(out_dir))
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy=vision_feature_select_strategy,
                               num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(str(out_dir))
    return out_dir


@functools.lru_cache(maxsize=8)
def hf_model(model_dir: str, dtype: torch.dtype = torch.float32) -> LlavaForConditionalGeneration:
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # generate() would fill a None EOS back in from here
    return model


@functools.lru_cache(maxsize=8)
def hf_processor(model_dir: str) -> LlavaProcessor:
    return LlavaProcessor.from_pretrained(model_dir)


def hf_inputs(model_dir: str | Path, prompt: str, images: list) -> dict[str, torch.Tensor]:
    """transformers' LlavaProcessor on (prompt, images): input_ids [L] with expanded placeholders, pixel_values."""
    processor = hf_processor(str(model_dir))
    batch = processor(text=prompt, images=images or None, return_tensors="pt")
    out = {"input_ids": batch["input_ids"][0]}
    if images:
        out["pixel_values"] = batch["pixel_values"]
    return out


@torch.no_grad()
def hf_image_embeds(model_dir: str | Path, image) -> torch.Tensor:
    """The projector's output for one image [num_image_tokens, hidden], as transformers computes it."""
    pixel_values = hf_inputs(model_dir, IMAGE_TOKEN, [image])["pixel_values"]
    return hf_model(str(model_dir)).get_image_features(pixel_values=pixel_values).pooler_output[0]


def hf_reference(model_dir: str | Path, prompt: str, images: list, max_new_tokens: int,
                 dtype: torch.dtype = torch.float32) -> tuple[list[int], list[int], list[torch.Tensor]]:
    """(expanded prompt ids, greedy new ids, log_softmax of each step's raw logits) from transformers."""
    inputs = hf_inputs(model_dir, prompt, images)
    mm = {"pixel_values": inputs["pixel_values"].to(dtype)} if images else {}
    ids, logprobs = hf_generate(hf_model(str(model_dir), dtype), inputs["input_ids"], max_new_tokens, **mm)
    return inputs["input_ids"].tolist(), ids, logprobs

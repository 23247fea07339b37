"""Tiny random LLaVA-NeXT checkpoints (CLIP tower + projector + image_newline + Llama/Mistral/Qwen2 LM) built and
run with transformers.

`build_tiny_llava_next` writes what `save_pretrained` writes for llava-hf/llava-v1.6-*: config.json with
`image_grid_pinpoints`, safetensors, LLaVA-1.5's test tokenizer and chat template (tests/oracle/llava.py), and
processor_config.json from transformers' own `LlavaNextProcessor` with a `LlavaNextImageProcessorPil`. The tiles are
24 x 24 pixels of 6 x 6 patches (16 features a tile) and the pinpoints are llava-hf's defaults scaled from 336 to 24,
so the grids are 1x2, 2x1, 2x2, 1x3 and 3x1 tiles and an image takes 16 + up to 72 placeholders.
`hf_inputs` / `hf_reference` run transformers' processor and greedy `generate` at batch size 1.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from transformers import (
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
)

from tests.oracle.llama import build_llama_tokenizer, hf_generate, llama_text_config, reinit_
from tests.oracle.llava import CHAT_TEMPLATE, IMAGE_TOKEN

TILE = 24
PINPOINTS = [[24, 48], [48, 24], [48, 48], [72, 24], [24, 72]]  # llava-hf's [[336, 672], ...] x 24 / 336


def build_tiny_llava_next(
    out_dir: str | Path,
    *,
    seed: int = 0,
    image_size: int = TILE,
    patch_size: int = 6,
    image_grid_pinpoints: list[list[int]] | None = None,
    vision_feature_layer: int | list[int] = -2,
    vision_act: str = "quick_gelu",
    multimodal_projector_bias: bool = True,
    init_gain: float = 1.5,
    text_kwargs: dict | None = None,
    qwen2: bool = False,
    tie_word_embeddings: bool = False,
) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pinpoints = image_grid_pinpoints or PINPOINTS
    tokenizer = build_llama_tokenizer(extra_special=(IMAGE_TOKEN,))
    tokenizer.chat_template = CHAT_TEMPLATE
    if qwen2:
        from transformers import Qwen2Config

        text = llama_text_config(tokenizer, **(text_kwargs or {})).to_dict()
        keep = set(Qwen2Config().to_dict())
        text_config = Qwen2Config(**{k: v for k, v in text.items() if k in keep and k != "model_type"}).to_dict()
    else:
        text_config = llama_text_config(tokenizer, **(text_kwargs or {})).to_dict()
    config = LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=68, num_hidden_layers=3,
                           num_attention_heads=4, image_size=image_size, patch_size=patch_size, hidden_act=vision_act,
                           projection_dim=16),
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        multimodal_projector_bias=multimodal_projector_bias,
        image_grid_pinpoints=pinpoints,
        image_seq_length=(image_size // patch_size) ** 2,
        tie_word_embeddings=tie_word_embeddings,  # what transformers ties by, not text_config's flag
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    reinit_(model, seed, init_gain, 1.0)
    with torch.no_grad():  # reinit_ draws image_newline (a 1-D "bias") at std 0.1: give it a text embedding's scale
        model.model.image_newline.copy_(torch.randn(config.text_config.hidden_size,
                                                    generator=torch.Generator().manual_seed(seed + 1)))
    model.save_pretrained(str(out_dir))
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": image_size},
                                                 crop_size={"height": image_size, "width": image_size},
                                                 image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(str(out_dir))
    return out_dir


@functools.lru_cache(maxsize=8)
def hf_model(model_dir: str, dtype: torch.dtype = torch.float32) -> LlavaNextForConditionalGeneration:
    model = LlavaNextForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # generate() would fill a None EOS back in from here
    return model


@functools.lru_cache(maxsize=8)
def hf_processor(model_dir: str) -> LlavaNextProcessor:
    return LlavaNextProcessor.from_pretrained(model_dir)


def hf_inputs(model_dir: str | Path, prompt: str, images: list) -> dict[str, torch.Tensor]:
    """transformers' LlavaNextProcessor on (prompt, images): input_ids [L] with expanded placeholders, pixel_values
    [num_images, max tiles, 3, S, S] (zero tiles pad the batch) and image_sizes [num_images, 2]."""
    processor = hf_processor(str(model_dir))
    batch = processor(text=prompt, images=images or None, return_tensors="pt")
    out = {"input_ids": batch["input_ids"][0]}
    if images:
        out["pixel_values"], out["image_sizes"] = batch["pixel_values"], batch["image_sizes"]
    return out


@torch.no_grad()
def hf_image_embeds(model_dir: str | Path, image) -> torch.Tensor:
    """One image's features as transformers packs them (base tile, unpadded grid with image_newline per row)
    [num_image_tokens, hidden]."""
    inputs = hf_inputs(model_dir, IMAGE_TOKEN, [image])
    out = hf_model(str(model_dir)).model.get_image_features(pixel_values=inputs["pixel_values"],
                                                            image_sizes=inputs["image_sizes"])
    return out.pooler_output[0]


def hf_reference(model_dir: str | Path, prompt: str, images: list, max_new_tokens: int,
                 dtype: torch.dtype = torch.float32) -> tuple[list[int], list[int], list[torch.Tensor]]:
    """(expanded prompt ids, greedy new ids, log_softmax of each step's raw logits) from transformers."""
    inputs = hf_inputs(model_dir, prompt, images)
    mm = {"pixel_values": inputs["pixel_values"].to(dtype), "image_sizes": inputs["image_sizes"]} if images else {}
    ids, logprobs = hf_generate(hf_model(str(model_dir), dtype), inputs["input_ids"], max_new_tokens, **mm)
    return inputs["input_ids"].tolist(), ids, logprobs

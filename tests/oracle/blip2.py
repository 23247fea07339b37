"""Tiny random BLIP-2 (ViT + Q-Former + OPT) checkpoints built and run with transformers: the oracle.

`build_tiny_blip2` writes what `save_pretrained` writes for a real model (config, safetensors, tokenizer,
processor), so fovea loads it exactly as it would load Salesforce/blip2-opt-2.7b. `hf_reference` runs
transformers' own processor and `generate` on it, greedy, at batch size 1.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessorPil,
    GenerationConfig,
)

from tests.oracle.tokenizer import build_tokenizer

IMAGE_TOKEN = "<image>"


def _reinit_(model: torch.nn.Module, seed: int, gain: float, embed_std: float) -> None:
    """Re-draw every parameter so that greedy decoding is far from constant and depends on the image.

    transformers' own init (std 0.02, vision 1e-10, zero query tokens) gives a tiny model near-flat logits and
    the same image features for every image, so a test could not tell a bug from the truth. Matrices get
    std gain/sqrt(fan_in) (gain > 1 so each layer moves the residual stream away from the input embedding,
    which a tied lm_head would otherwise just echo back), norms 1 +- 0.1, biases 0.1, embeddings `embed_std`.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name.lower() and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif "embed" in name or name == "query_tokens":
                param.copy_(noise * embed_std)
            elif param.dim() >= 2:
                param.copy_(noise * (gain / param[0].numel() ** 0.5))
            else:
                param.copy_(noise * 0.1)


def build_tiny_blip2(
    out_dir: str | Path,
    *,
    seed: int = 0,
    word_embed_proj_dim: int | None = None,
    do_layer_norm_before: bool = True,
    num_query_tokens: int = 8,
    image_size: int = 30,
    patch_size: int = 6,
    vision_hidden: int = 32,
    qformer_hidden: int = 32,
    text_hidden: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    cross_attention_frequency: int = 1,
    use_qformer_text_input: bool = False,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 256,
    init_gain: float = 3.0,
    embed_std: float = 1.0,
    text_config_overrides: dict | None = None,
) -> Path:
    """Build, randomise and save a tiny `Blip2ForConditionalGeneration` with its tokenizer and processor.

    `text_config_overrides` go into the OPT config as they are (e.g. enable_bias=False).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vocab_size = (len(tokenizer) + 15) // 16 * 16 + 16  # like OPT's 50272 > 50265: a few unused rows
    config = Blip2Config(
        vision_config=dict(
            hidden_size=vision_hidden,
            intermediate_size=2 * vision_hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            image_size=image_size,
            patch_size=patch_size,
        ),
        qformer_config=dict(
            hidden_size=qformer_hidden,
            intermediate_size=2 * qformer_hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            cross_attention_frequency=cross_attention_frequency,
            use_qformer_text_input=use_qformer_text_input,
            max_position_embeddings=64,
            vocab_size=128,
        ),
        text_config=dict(
            model_type="opt",
            hidden_size=text_hidden,
            ffn_dim=2 * text_hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            vocab_size=vocab_size,
            max_position_embeddings=max_position_embeddings,
            word_embed_proj_dim=word_embed_proj_dim or text_hidden,
            do_layer_norm_before=do_layer_norm_before,
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **(text_config_overrides or {}),
        ),
        num_query_tokens=num_query_tokens,
        image_token_index=image_token_index,
    )
    model = Blip2ForConditionalGeneration(config).eval()
    _reinit_(model, seed, init_gain, embed_std)
    model.save_pretrained(str(out_dir))
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=num_query_tokens)
    processor.save_pretrained(str(out_dir))
    return out_dir


def load_hf(model_dir: str | Path,
            dtype: torch.dtype = torch.float32) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    """transformers' model (in `dtype`, eval, EOS disabled) and processor for a checkpoint, cached per process."""
    return _load(str(model_dir), dtype)


@functools.lru_cache(maxsize=8)
def _load(model_dir: str, dtype: torch.dtype = torch.float32):
    model = Blip2ForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
    # generate() fills every None in the GenerationConfig it is given from the model's own, so
    # `eos_token_id=None` alone does not stop EOS from ending generation; clear it at the source.
    model.generation_config.eos_token_id = None
    model.language_model.generation_config.eos_token_id = None
    processor = AutoProcessor.from_pretrained(model_dir)
    return model, processor


def _greedy_config(model, max_new_tokens: int) -> GenerationConfig:
    text_config = model.config.text_config
    # No EOS (see _load): the reference always runs max_new_tokens steps, so tests compare a fixed length.
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=None,
        bos_token_id=text_config.bos_token_id,
        pad_token_id=text_config.pad_token_id,
        output_logits=True,
        return_dict_in_generate=True,
    )


def hf_inputs(model_dir: str | Path, prompt: str, image: Image.Image | None) -> dict[str, torch.Tensor]:
    """What transformers' Blip2Processor makes of (prompt, image): input_ids [1, L], pixel_values if image."""
    _, processor = _load(str(model_dir))
    if image is None:
        return {"input_ids": processor.tokenizer(prompt, return_tensors="pt").input_ids}
    batch = processor(images=image, text=prompt, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"]}


@torch.no_grad()
def hf_reference(
    model_dir: str | Path, prompt: str, image: Image.Image | None, max_new_tokens: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy generation with transformers: (new token ids, log_softmax of each step's raw logits [vocab]).

    With an image, `Blip2ForConditionalGeneration.generate` on the processor's output (query placeholders
    before BOS). Without, the OPT language model alone on the tokenizer's ids (BOS first). The model runs in
    `dtype` (pixel values are given to it in that dtype).
    """
    model, _ = _load(str(model_dir), dtype)
    inputs = hf_inputs(model_dir, prompt, image)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    kwargs = dict(generation_config=_greedy_config(model, max_new_tokens))
    if image is None:
        out = model.language_model.generate(input_ids=inputs["input_ids"], **kwargs)
    else:
        out = model.generate(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"], **kwargs)
    if len(out.logits) != max_new_tokens:
        raise AssertionError(f"transformers stopped after {len(out.logits)} of {max_new_tokens} tokens")
    token_ids = out.sequences[0, -max_new_tokens:].tolist()
    logprobs = [torch.log_softmax(step[0].float(), dim=-1) for step in out.logits]
    return token_ids, logprobs

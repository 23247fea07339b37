"""Tiny random Qwen2.5-VL checkpoints built and run with transformers: the oracle.

`build_tiny_qwen2_5_vl` writes what a real checkpoint directory holds: config.json, model.safetensors, a
tokenizer with Qwen's special tokens and a Qwen-style chat template, and processor_config.json with the
image processor's options (from transformers' `Qwen2VLImageProcessorPil`) and the video processor's (written
out by hand: transformers' `Qwen2VLVideoProcessor` needs torchvision, which this environment lacks).

`hf_reference` runs transformers' `Qwen2_5_VLForConditionalGeneration.generate` greedily at batch size 1 on
given input ids and processed tensors. transformers 5.23 computes M-RoPE positions only when it is given
`mm_token_type_ids` (without them it silently falls back to 1-D positions), so they are derived from the ids.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from tests.oracle.tokenizer import _CORPUS

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"

# Qwen2-VL's conversation format: a default system turn, then <|im_start|>role\n...<|im_end|>\n per message;
# content parts of type image / video become a vision_start, pad, vision_end triple.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url', 'image_pil') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] in ('video', 'video_url') %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the shared corpus (no BOS, as Qwen's) plus Qwen's special tokens at the end."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=4096)
    tokenizer.add_tokens(SPECIAL_TOKENS, special_tokens=True)
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _reinit_(model: torch.nn.Module, seed: int, gain: float, vision_gain: float) -> None:
    """Re-draw every parameter so greedy decoding varies from step to step and depends on the pixels.

    Matrices std gain/sqrt(fan_in); norms 1 +- 0.1; biases 0.1; token embeddings std 1 (transformers' own init,
    std 0.02, gives a tiny model near-flat logits that cannot tell a bug from the truth). The gains stay
    moderate: larger ones make the random network chaotic, and it then amplifies float32 rounding (fovea's
    patch embedding is a matmul, transformers' a Conv3d: about 1e-6 apart relative) past the 1e-4 tolerance.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name or "ln_q" in name:
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith("embed_tokens.weight"):
                param.copy_(noise)
            elif param.dim() >= 2:
                scale = vision_gain if "visual" in name else gain
                param.copy_(noise * (scale / param[0].numel() ** 0.5))
            else:
                param.copy_(noise * 0.1)


def build_tiny_qwen2_5_vl(
    out_dir: str | Path,
    *,
    seed: int = 0,
    text_hidden: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    num_layers: int = 2,
    mrope_section: tuple[int, int, int] = (2, 3, 3),
    vision_hidden: int = 32,
    vision_heads: int = 2,
    vision_depth: int = 3,
    fullatt_block_indexes: tuple[int, ...] = (1,),
    window_size: int = 56,  # pixels: 2x2 merged tokens per window
    tokens_per_second: int = 2,
    tie_word_embeddings: bool = False,
    min_pixels: int = 28 * 28 * 4,
    max_pixels: int = 28 * 28 * 48,
    video_min_pixels: int = 28 * 28 * 2,
    video_max_pixels: int = 28 * 28 * 8,
    init_gain: float = 1.5,
    vision_init_gain: float = 1.0,
) -> Path:
    """Build, randomise and save a tiny `Qwen2_5_VLForConditionalGeneration` with tokenizer and processor."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=vision_depth, hidden_size=vision_hidden, num_heads=vision_heads, intermediate_size=48,
            out_hidden_size=text_hidden, window_size=window_size, fullatt_block_indexes=list(fullatt_block_indexes),
            tokens_per_second=tokens_per_second,
        ),
        text_config=dict(
            vocab_size=(len(tokenizer) + 15) // 16 * 16, hidden_size=text_hidden, intermediate_size=2 * text_hidden,
            num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, num_hidden_layers=num_layers,
            rope_parameters=dict(rope_type="default", mrope_section=list(mrope_section), rope_theta=10000.0),
            max_position_embeddings=4096, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    _reinit_(model, seed, init_gain, vision_init_gain)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    video_processor = {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "size": {"shortest_edge": video_min_pixels, "longest_edge": video_max_pixels},
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "resample": 3,
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(image_processor.image_mean), "image_std": list(image_processor.image_std),
        "do_convert_rgb": True,
    }
    processor_config = {"processor_class": "Qwen2_5_VLProcessor", "image_processor": image_processor.to_dict(),
                        "video_processor": video_processor}
    (out_dir / "processor_config.json").write_text(json.dumps(processor_config, indent=2))
    return out_dir


def build_tiny_qwen2(out_dir: str | Path, *, seed: int = 0, hidden: int = 64, num_heads: int = 4,
                     num_kv_heads: int = 2, num_layers: int = 2, tie_word_embeddings: bool = True,
                     init_gain: float = 1.5) -> Path:
    """A tiny random text-only `Qwen2ForCausalLM` with the same tokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_qwen_tokenizer()
    config = Qwen2Config(
        vocab_size=(len(tokenizer) + 15) // 16 * 16, hidden_size=hidden, intermediate_size=2 * hidden,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, num_hidden_layers=num_layers,
        max_position_embeddings=4096, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    _reinit_(model, seed, init_gain, init_gain)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


@functools.lru_cache(maxsize=4)
def hf_model(model_dir: str,
             dtype: torch.dtype = torch.float32) -> Qwen2_5_VLForConditionalGeneration | Qwen2ForCausalLM:
    """transformers' model for a checkpoint written above (either architecture), in `dtype`, EOS off."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    cls = Qwen2ForCausalLM if config["architectures"] == ["Qwen2ForCausalLM"] else Qwen2_5_VLForConditionalGeneration
    model = cls.from_pretrained(model_dir, dtype=dtype).eval()
    # generate() fills every None of the GenerationConfig it is given from the model's own, so clear EOS there
    model.generation_config.eos_token_id = None
    return model


@functools.lru_cache(maxsize=4)
def hf_image_processor(model_dir: str) -> Qwen2VLImageProcessorPil:
    config = json.loads((Path(model_dir) / "processor_config.json").read_text())["image_processor"]
    options = {k: v for k, v in config.items() if k != "image_processor_type"}
    return Qwen2VLImageProcessorPil(**options)


def mm_token_type_ids(model_dir: str | Path, input_ids: torch.Tensor) -> torch.Tensor:
    """text 0, image placeholder 1, video placeholder 2 (what Qwen2_5_VLProcessor returns)."""
    config = hf_model(str(model_dir)).config
    if not hasattr(config, "image_token_id"):
        return torch.zeros_like(input_ids, dtype=torch.int32)
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == config.image_token_id] = 1
    types[input_ids == config.video_token_id] = 2
    return types


@torch.no_grad()
def hf_reference(model_dir: str | Path, input_ids: torch.Tensor, max_new_tokens: int,
                 dtype: torch.dtype = torch.float32,
                 **mm_inputs: torch.Tensor | None) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy generation with transformers: (new token ids, log_softmax of each step's raw logits [vocab]).

    input_ids [L] with expanded placeholders; mm_inputs: pixel_values / image_grid_thw / pixel_values_videos /
    video_grid_thw / second_per_grid_ts as the model's forward takes them (None entries are dropped); the model
    runs in `dtype`.
    """
    model = hf_model(str(model_dir), dtype)
    ids = input_ids.view(1, -1)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=None,
                              pad_token_id=model.config.get_text_config().pad_token_id, output_logits=True,
                              return_dict_in_generate=True)
    kwargs = {k: v for k, v in mm_inputs.items() if v is not None}
    if isinstance(model, Qwen2_5_VLForConditionalGeneration):
        kwargs["mm_token_type_ids"] = mm_token_type_ids(model_dir, ids)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config, **kwargs)
    if len(out.logits) != max_new_tokens:
        raise AssertionError(f"transformers stopped after {len(out.logits)} of {max_new_tokens} tokens")
    token_ids = out.sequences[0, -max_new_tokens:].tolist()
    return token_ids, [torch.log_softmax(step[0].float(), dim=-1) for step in out.logits]

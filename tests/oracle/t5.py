"""Tiny random T5 / Flan-T5 checkpoints (text-only, BLIP-2 and InstructBLIP over them), built and run with
transformers: the oracle of the encoder-decoder path.

The tokenizer is T5's shape: `<pad>` 0 (also the decoder's start token), `</s>` 1 appended to every encoding,
`<unk>` 2, no BOS. transformers 5.23's generate fails when a T5 decoder has more layers than its encoder, so
the fixtures never build one.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    BlipImageProcessorPil,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    GenerationConfig,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from tests.oracle.blip2 import IMAGE_TOKEN, _reinit_
from tests.oracle.tokenizer import _CORPUS

T5_SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0..2, T5's order


def build_t5_tokenizer(vocab_size: int = 600, extra_special: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=T5_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line] * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A:0 </s>:0", pair="$A:0 </s>:0 $B:1 </s>:1", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", model_max_length=512)
    if extra_special:
        tokenizer.add_tokens(list(extra_special), special_tokens=True)
    return tokenizer


def t5_text_config(vocab_size: int, *, d_model: int = 32, num_layers: int = 2, num_decoder_layers: int | None = None,
                   num_heads: int = 4, flan: bool = True, **overrides) -> dict:
    return dict(model_type="t5", vocab_size=vocab_size, d_model=d_model, d_kv=d_model // num_heads,
                d_ff=2 * d_model, num_layers=num_layers, num_decoder_layers=num_decoder_layers or num_layers,
                num_heads=num_heads, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                feed_forward_proj="gated-gelu" if flan else "relu", dropout_rate=0.0, pad_token_id=0,
                eos_token_id=1, decoder_start_token_id=0, **overrides)


def _vocab_size(tokenizer) -> int:
    return (len(tokenizer) + 15) // 16 * 16 + 16  # a few unused rows, as T5's 32128 > 32100


def rewrite_hub_form(out_dir: Path, *, own_lm_head: bool, seed: int = 99) -> None:
    """Turn a 5.23 save into the form a Hub checkpoint has: config.json's `tie_word_embeddings` (false for
    Flan-T5, which stores its own `lm_head.weight`; true for T5 v1.0, which stores none) and no
    `scale_decoder_outputs`."""
    config = json.loads((out_dir / "config.json").read_text())
    target = config.get("text_config", config)
    target.pop("scale_decoder_outputs", None)
    target["tie_word_embeddings"] = not own_lm_head
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if own_lm_head:
        weights = load_file(out_dir / "model.safetensors")
        prefix = "language_model." if "text_config" in config else ""
        shared = weights[prefix + "shared.weight"]
        gen = torch.Generator().manual_seed(seed)
        weights[prefix + "lm_head.weight"] = torch.randn(shared.shape, generator=gen) / shared.shape[1] ** 0.5
        save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})


def build_tiny_t5(out_dir: str | Path, *, seed: int = 0, flan: bool = True, hub_form: str | None = None,
                  init_gain: float = 2.0, **config_kw) -> Path:
    """A tiny `T5ForConditionalGeneration` + tokenizer. hub_form: None (as 5.23 saves it), "flan" (untied,
    own lm_head) or "v1" (tied, decoder output rescaled)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_t5_tokenizer()
    config = T5Config(**t5_text_config(_vocab_size(tokenizer), flan=flan, **config_kw))
    model = T5ForConditionalGeneration(config).eval()
    _reinit_(model, seed, init_gain, embed_std=1.0)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    if hub_form is not None:
        rewrite_hub_form(out_dir, own_lm_head=hub_form == "flan")
    return out_dir


def _vision_qformer(hidden: int, num_layers: int, num_heads: int, image_size: int, patch_size: int,
                    qformer_vocab: int = 128, **qformer_kw) -> dict:
    return dict(
        vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                           num_attention_heads=num_heads, image_size=image_size, patch_size=patch_size),
        qformer_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                            num_attention_heads=num_heads, max_position_embeddings=64, vocab_size=qformer_vocab,
                            **qformer_kw))


def build_tiny_blip2_t5(out_dir: str | Path, *, seed: int = 0, num_query_tokens: int = 8, image_size: int = 30,
                        patch_size: int = 6, hidden: int = 32, num_layers: int = 2, num_heads: int = 4,
                        hub_form: str | None = None, init_gain: float = 2.0, **t5_kw) -> Path:
    """A tiny `Blip2ForConditionalGeneration` whose language model is a Flan-T5 (or T5 v1.0, flan=False)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_t5_tokenizer(extra_special=(IMAGE_TOKEN,))
    config = Blip2Config(
        **_vision_qformer(hidden, num_layers, num_heads, image_size, patch_size),
        text_config=t5_text_config(_vocab_size(tokenizer), d_model=hidden, num_layers=num_layers,
                                   num_heads=num_heads, **t5_kw),
        num_query_tokens=num_query_tokens, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    model = Blip2ForConditionalGeneration(config).eval()
    _reinit_(model, seed, init_gain, embed_std=1.0)
    model.save_pretrained(str(out_dir))
    processor = Blip2Processor(image_processor=BlipImageProcessorPil(size={"height": image_size, "width": image_size}),
                               tokenizer=tokenizer, num_query_tokens=num_query_tokens)
    processor.save_pretrained(str(out_dir))
    if hub_form is not None:
        rewrite_hub_form(out_dir, own_lm_head=hub_form == "flan")
    return out_dir


def build_tiny_instructblip_t5(out_dir: str | Path, *, seed: int = 0, num_query_tokens: int = 8,
                               image_size: int = 30, patch_size: int = 6, hidden: int = 32, num_layers: int = 2,
                               num_heads: int = 4, init_gain: float = 2.0, **t5_kw) -> Path:
    """A tiny `InstructBlipForConditionalGeneration` over a Flan-T5 (Salesforce/instructblip-flan-t5-*'s shape)."""
    from tests.oracle.instructblip import build_qformer_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_t5_tokenizer(extra_special=(IMAGE_TOKEN,))
    qformer_tokenizer = build_qformer_tokenizer()
    config = InstructBlipConfig(
        **_vision_qformer(hidden, num_layers, num_heads, image_size, patch_size, len(qformer_tokenizer),
                          pad_token_id=qformer_tokenizer.pad_token_id),
        text_config=t5_text_config(_vocab_size(tokenizer), d_model=hidden, num_layers=num_layers,
                                   num_heads=num_heads, **t5_kw),
        num_query_tokens=num_query_tokens, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    model = InstructBlipForConditionalGeneration(config).eval()
    _reinit_(model, seed, init_gain, embed_std=1.0)
    model.save_pretrained(str(out_dir))
    processor = InstructBlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer, num_query_tokens=num_query_tokens)
    processor.save_pretrained(str(out_dir))
    return out_dir


_CLASSES = {"T5ForConditionalGeneration": T5ForConditionalGeneration,
            "Blip2ForConditionalGeneration": Blip2ForConditionalGeneration,
            "InstructBlipForConditionalGeneration": InstructBlipForConditionalGeneration}
_PROCESSORS = {"Blip2ForConditionalGeneration": Blip2Processor,
               "InstructBlipForConditionalGeneration": InstructBlipProcessor}


@functools.lru_cache(maxsize=8)
def load_hf(model_dir: str, dtype: torch.dtype = torch.float32):
    """transformers' model (eval, EOS never ends generation) and its processor or tokenizer."""
    arch = json.loads((Path(model_dir) / "config.json").read_text())["architectures"][0]
    model = _CLASSES[arch].from_pretrained(model_dir, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    if hasattr(model, "language_model"):
        model.language_model.generation_config.eos_token_id = None
    if arch in _PROCESSORS:
        return model, _PROCESSORS[arch].from_pretrained(model_dir)
    return model, PreTrainedTokenizerFast.from_pretrained(model_dir)


@torch.no_grad()
def hf_reference(model_dir: str | Path, prompt: str, image: Image.Image | None, max_new_tokens: int,
                 dtype: torch.dtype = torch.float32) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy generation with transformers at batch size 1: (new token ids, log_softmax of each step's raw
    logits [vocab]). The prompt goes to the encoder (with the image's query tokens in front); the decoder
    starts from decoder_start_token_id."""
    model, processor = load_hf(str(model_dir), dtype)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=None,
                              pad_token_id=0, decoder_start_token_id=0, output_logits=True,
                              return_dict_in_generate=True)
    if image is None:
        tokenizer = getattr(processor, "tokenizer", processor)
        inputs = {"input_ids": tokenizer(prompt, return_tensors="pt").input_ids}
        lm = getattr(model, "language_model", model)
        out = lm.generate(**inputs, generation_config=config)
    else:
        inputs = dict(processor(images=image, text=prompt, return_tensors="pt"))
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        out = model.generate(**inputs, generation_config=config)
    if len(out.logits) != max_new_tokens:
        raise AssertionError(f"transformers stopped after {len(out.logits)} of {max_new_tokens} tokens")
    return out.sequences[0, -max_new_tokens:].tolist(), [torch.log_softmax(s[0].float(), dim=-1) for s in out.logits]

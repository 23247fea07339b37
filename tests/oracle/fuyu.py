"""Tiny random Fuyu checkpoints (30 x 30 patches projected into a Persimmon LM) built and run with transformers.

`build_tiny_fuyu` writes what `save_pretrained` writes for adept/fuyu-8b: config.json, safetensors, a tokenizer
with Fuyu's tokens, and processor_config.json from transformers' own `FuyuProcessor` with a `FuyuImageProcessorPil`.

The tokenizer behaves as Fuyu's sentencepiece one where `FuyuProcessor` relies on it: `|SPEAKER|`, `|NEWLINE|`,
`<s>`, `<0x04>` and `|ENDOFTEXT|` (BOS and EOS) are single tokens of the vocabulary, and "\u2581" is put in front
of the text, so "|SPEAKER||NEWLINE|<s>" encodes as "\u2581", "|SPEAKER|", "|NEWLINE|", "<s>" (the processor drops
that first token).

In transformers 5.23 `FuyuProcessor` with `FuyuImageProcessorPil` fails: the image processor returns torch tensors
and `patchify_image` transposes them as numpy arrays. `hf_processor` hands `patchify_image` the numpy array of the
same pixels instead (nothing else changes), so every other step of transformers' processor runs as it is.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    FuyuConfig,
    FuyuForCausalLM,
    FuyuImageProcessorPil,
    FuyuProcessor,
    PreTrainedTokenizerFast,
)

from tests.oracle.llama import hf_generate, reinit_
from tests.oracle.tokenizer import _CORPUS

FUYU_TOKENS = ("|ENDOFTEXT|", "|SPEAKER|", "|NEWLINE|", "<s>", "<0x04>")
PATCH = 30


def build_fuyu_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    pattern = "|".join(Regex_escape(t) for t in FUYU_TOKENS) + "|\n"
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    alphabet = [chr(c) for c in range(32, 127)] + ["\n", "\u2581"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>"], initial_alphabet=alphabet,
                                  show_progress=False)
    lines = [line for line in _CORPUS.splitlines() if line]
    # the Fuyu tokens, repeated, become whole tokens of the vocabulary (as in Fuyu's sentencepiece model)
    tok.train_from_iterator(lines * 4 + ["".join(FUYU_TOKENS)] * 50, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="|ENDOFTEXT| $A:0", pair="|ENDOFTEXT| $A:0 $B:1",
        special_tokens=[("|ENDOFTEXT|", tok.token_to_id("|ENDOFTEXT|"))])
    for token in FUYU_TOKENS:
        encoded = tok.encode(token, add_special_tokens=False).tokens
        assert encoded == ["\u2581", token], (token, encoded)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="|ENDOFTEXT|", eos_token="|ENDOFTEXT|",
                                   unk_token="<unk>", model_max_length=4096)


def Regex_escape(text: str) -> str:  # noqa: N802 (re.escape, for the tokenizers library's Oniguruma regexes)
    return "".join("\\" + c if c in "|<>()[]{}.*+?^$\\" else c for c in text)


class NumpyPatchifyFuyuImageProcessorPil(FuyuImageProcessorPil):
    """transformers' `FuyuImageProcessorPil`, except that `patchify_image` is handed the numpy array of the
    torch tensor `FuyuProcessor` gives it (its numpy transposes fail on a tensor in transformers 5.23)."""

    def patchify_image(self, image, patch_size=None):
        return torch.from_numpy(super().patchify_image(np.asarray(image), patch_size=patch_size))


def build_tiny_fuyu(
    out_dir: str | Path,
    *,
    seed: int = 0,
    size: tuple[int, int] = (150, 210),  # (height, width): at most 5 rows of 7 patches
    hidden: int = 64,
    num_heads: int = 4,
    num_layers: int = 2,
    qk_layernorm: bool = True,
    partial_rotary_factor: float = 0.5,
    init_gain: float = 1.0,
) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_fuyu_tokenizer()
    vocab = tokenizer.get_vocab()
    text_config = dict(
        model_type="persimmon", vocab_size=(len(tokenizer) + 15) // 16 * 16, hidden_size=hidden,
        intermediate_size=2 * hidden + 8, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        hidden_act="relu2", qk_layernorm=qk_layernorm, max_position_embeddings=512, layer_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 25000.0, "partial_rotary_factor": partial_rotary_factor},
        bos_token_id=vocab["<s>"], eos_token_id=tokenizer.eos_token_id,
    )
    config = FuyuConfig(text_config=text_config, image_token_id=vocab["|SPEAKER|"], patch_size=PATCH,
                        num_channels=3)
    torch.manual_seed(seed)
    model = FuyuForCausalLM(config).eval()
    reinit_(model, seed, init_gain)
    with torch.no_grad():  # reinit_ takes the patch projection for an embedding table (std 1): make it a matrix
        weight = model.get_submodule("model.vision_embed_tokens").weight
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)) / weight.shape[1] ** 0.5)
    model.save_pretrained(str(out_dir))
    image_processor = FuyuImageProcessorPil(size={"height": size[0], "width": size[1]})
    FuyuProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(out_dir))
    return out_dir


@functools.lru_cache(maxsize=8)
def hf_model(model_dir: str, dtype: torch.dtype = torch.float32) -> FuyuForCausalLM:
    model = FuyuForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # generate() would fill a None EOS back in from here
    return model


@functools.lru_cache(maxsize=8)
def hf_processor(model_dir: str) -> FuyuProcessor:
    processor = FuyuProcessor.from_pretrained(model_dir)
    assert type(processor.image_processor) is FuyuImageProcessorPil  # transformers without torchvision
    processor.image_processor.__class__ = NumpyPatchifyFuyuImageProcessorPil  # the same options, numpy patchify
    return processor


def hf_inputs(model_dir: str | Path, prompt: str, images: list) -> dict[str, torch.Tensor]:
    """transformers' FuyuProcessor on (prompt, images): input_ids [L] with the image rows in front, pixel_values."""
    processor = hf_processor(str(model_dir))
    batch = processor(text=prompt, images=images[0] if images else None, return_tensors="pt",
                      return_legacy_image_output=False)
    out = {"input_ids": batch["input_ids"][0]}
    if images:
        # an image of one patch comes back as [2700], not [1, 2700] (FuyuProcessor squeezes the patch dimension of
        # each image), and transformers' model then fails on it: restore the dimension it squeezed
        pixel_values = batch["pixel_values"]
        out["pixel_values"] = pixel_values[None] if pixel_values.dim() == 1 else pixel_values
    return out


def hf_reference(model_dir: str | Path, prompt: str, images: list, max_new_tokens: int,
                 dtype: torch.dtype = torch.float32) -> tuple[list[int], list[int], list[torch.Tensor]]:
    """(prompt ids, greedy new ids, log_softmax of each step's raw logits) from transformers."""
    if len(images) > 1:
        raise ValueError("FuyuProcessor takes one image per prompt")
    inputs = hf_inputs(model_dir, prompt, images)
    mm = {"pixel_values": inputs["pixel_values"].to(dtype)} if images else {}
    ids, logprobs = hf_generate(hf_model(str(model_dir), dtype), inputs["input_ids"], max_new_tokens, **mm)
    return inputs["input_ids"].tolist(), ids, logprobs

"""Tiny random InstructBLIP (ViT + instruction-aware Q-Former + OPT) checkpoints built and run with transformers.

`build_tiny_instructblip` writes what `save_pretrained` writes for Salesforce/instructblip-*: config, safetensors,
the LM tokenizer, the Q-Former's own BERT-style tokenizer (in `qformer_tokenizer/`) and the processor.
`hf_reference` runs transformers' `InstructBlipProcessor` and `generate` on it, greedy, at batch size 1.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    BlipImageProcessorPil,
    GenerationConfig,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    PreTrainedTokenizerFast,
)

from tests.oracle.blip2 import IMAGE_TOKEN, _reinit_
from tests.oracle.llama import build_llama_tokenizer, llama_text_config
from tests.oracle.tokenizer import _CORPUS, build_tokenizer

QFORMER_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # BERT's, ids 0..4


def build_qformer_tokenizer(vocab_size: int = 200) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer (lower-cased, [CLS] ... [SEP]), as the Q-Former's bert-base-uncased is.

    The vocabulary is written out, not trained: `WordPieceTrainer` gives a different vocabulary from one process
    to the next (huggingface/tokenizers#1794: continuing-subword ids follow hash-map order and break count ties),
    so every test process got another Q-Former input and another InstructBLIP case. Here: the special tokens, every
    character of the corpus alone and as a `##` continuation (so any corpus word encodes), then whole words, most
    frequent first, ties alphabetical."""
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: dict[str, int] = {}
    for line in _CORPUS.splitlines():
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
            counts[word] = counts.get(word, 0) + 1
    chars = sorted({c for word in counts for c in word})
    vocab = [*QFORMER_SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)]
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    vocab += words[:max(0, vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A:0 [SEP]:0", pair="[CLS] $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)


def build_tiny_instructblip(
    out_dir: str | Path,
    *,
    seed: int = 0,
    num_query_tokens: int = 8,
    image_size: int = 30,
    patch_size: int = 6,
    hidden: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    cross_attention_frequency: int = 1,
    max_position_embeddings: int = 256,
    init_gain: float = 2.0,
    embed_std: float = 1.0,
    language_model: str = "opt",
) -> Path:
    """Build, randomise and save a tiny `InstructBlipForConditionalGeneration` with an OPT LM, or with a Llama one
    (`language_model="llama"`: GQA, untied head, Vicuna's architecture) and a Llama-style tokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if language_model == "llama":
        tokenizer = build_llama_tokenizer(extra_special=(IMAGE_TOKEN,))
    else:
        tokenizer = build_tokenizer()
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    qformer_tokenizer = build_qformer_tokenizer()
    vocab_size = (len(tokenizer) + 15) // 16 * 16 + 16
    text_config = dict(model_type="opt", hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=num_layers,
                       num_attention_heads=num_heads, vocab_size=vocab_size,
                       max_position_embeddings=max_position_embeddings, word_embed_proj_dim=hidden,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    if language_model == "llama":
        text_config = llama_text_config(tokenizer, hidden=hidden, num_heads=num_heads, num_kv_heads=num_heads // 2,
                                        num_layers=num_layers, max_position_embeddings=max_position_embeddings).to_dict()
    config = InstructBlipConfig(
        vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                           num_attention_heads=num_heads, image_size=image_size, patch_size=patch_size),
        qformer_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                            num_attention_heads=num_heads, cross_attention_frequency=cross_attention_frequency,
                            max_position_embeddings=64, vocab_size=len(qformer_tokenizer),
                            pad_token_id=qformer_tokenizer.pad_token_id),
        text_config=text_config,
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    model = InstructBlipForConditionalGeneration(config).eval()
    _reinit_(model, seed, init_gain, embed_std)
    model.save_pretrained(str(out_dir))
    processor = InstructBlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer, num_query_tokens=num_query_tokens)
    processor.save_pretrained(str(out_dir))
    return out_dir


@functools.lru_cache(maxsize=4)
def _load(model_dir: str, dtype: torch.dtype = torch.float32):
    model = InstructBlipForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # as tests.oracle.blip2: EOS never ends the reference
    model.language_model.generation_config.eos_token_id = None
    return model, InstructBlipProcessor.from_pretrained(model_dir)


@torch.no_grad()
def hf_reference(model_dir: str | Path, prompt: str, image: Image.Image, max_new_tokens: int,
                 dtype: torch.dtype = torch.float32) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy generation with transformers: (new token ids, log_softmax of each step's raw logits [vocab])."""
    model, processor = _load(str(model_dir), dtype)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    text_config = model.config.text_config
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=None,
                              bos_token_id=text_config.bos_token_id, pad_token_id=text_config.pad_token_id,
                              output_logits=True, return_dict_in_generate=True)
    out = model.generate(**{**inputs, "pixel_values": inputs["pixel_values"].to(dtype)}, generation_config=config)
    if len(out.logits) != max_new_tokens:
        raise AssertionError(f"transformers stopped after {len(out.logits)} of {max_new_tokens} tokens")
    return out.sequences[0, -max_new_tokens:].tolist(), [torch.log_softmax(s[0].float(), dim=-1) for s in out.logits]

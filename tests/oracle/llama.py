"""Tiny random Llama / Mistral checkpoints built and run with transformers: the oracle for the text LMs.

`build_llama_tokenizer` is a Llama-style byte-level BPE (`<unk>` 0, `<s>` 1 = BOS, prepended to every
encoding, `</s>` 2 = EOS, `<pad>` 3), trained on the shared corpus so tests need no downloads.
`hf_reference` runs transformers' own `generate` greedily at batch size 1, with EOS off.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, MistralConfig, PreTrainedTokenizerFast

from tests.oracle.tokenizer import _CORPUS

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, Llama's first three


def build_llama_tokenizer(vocab_size: int = 700, extra_special: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line] * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A:0", pair="<s> $A:0 <s> $B:1",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", model_max_length=4096)
    if extra_special:
        tokenizer.add_tokens(list(extra_special), special_tokens=True)
    return tokenizer


def reinit_(model: torch.nn.Module, seed: int, gain: float, vision_gain: float | None = None) -> None:
    """Re-draw every parameter so greedy decoding varies from step to step (transformers' own init, std 0.02,
    gives a tiny model near-flat logits): matrices std gain/sqrt(fan_in) (`vision_gain` for the vision tower),
    norms 1 +- 0.1, biases 0.1, embeddings std 1 (vision embeddings std 0.5)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            is_vision = "vision" in name
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif "embed" in name and not name.endswith("patch_embedding.weight"):
                param.copy_(noise * (0.5 if is_vision else 1.0))
            elif param.dim() >= 2:
                scale = vision_gain if is_vision and vision_gain is not None else gain
                param.copy_(noise * (scale / param[0].numel() ** 0.5))
            else:
                param.copy_(noise * 0.1)


def llama_text_config(tokenizer, *, hidden: int = 64, num_heads: int = 4, num_kv_heads: int = 2,
                      num_layers: int = 2, max_position_embeddings: int = 512, tie_word_embeddings: bool = False,
                      rope_parameters: dict | None = None, mistral: bool = False, **overrides):
    cls = MistralConfig if mistral else LlamaConfig
    return cls(
        vocab_size=(len(tokenizer) + 15) // 16 * 16, hidden_size=hidden, intermediate_size=2 * hidden + 8,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, num_hidden_layers=num_layers,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )


def build_tiny_llama(out_dir: str | Path, *, seed: int = 0, init_gain: float = 1.5, **config_kwargs) -> Path:
    """A tiny random `LlamaForCausalLM` (or `MistralForCausalLM` with mistral=True) with its tokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_llama_tokenizer()
    config = llama_text_config(tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    reinit_(model, seed, init_gain)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


@functools.lru_cache(maxsize=8)
def hf_model(model_dir: str, dtype: torch.dtype = torch.float32):
    architecture = json.loads((Path(model_dir) / "config.json").read_text())["architectures"][0]
    import transformers

    model = getattr(transformers, architecture).from_pretrained(model_dir, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # generate() would fill a None EOS back in from here
    return model


def reset_dynamic_rope_(model) -> None:
    """transformers' dynamic RoPE keeps the longest length it has seen and keeps using its frequencies for
    shorter sequences until one falls below max_position_embeddings; each reference starts fresh instead."""
    for module in model.modules():
        if hasattr(module, "original_inv_freq") and hasattr(module, "max_seq_len_cached"):
            module.register_buffer("inv_freq", module.original_inv_freq.clone(), persistent=False)
            module.max_seq_len_cached = module.original_max_seq_len


@torch.no_grad()
def hf_generate(model, input_ids: torch.Tensor, max_new_tokens: int, **mm_inputs) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy `generate` at batch size 1: (new token ids, log_softmax of each step's raw logits [vocab])."""
    reset_dynamic_rope_(model)
    ids = input_ids.view(1, -1)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=None,
                              pad_token_id=model.config.get_text_config().pad_token_id, output_logits=True,
                              return_dict_in_generate=True)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config, **mm_inputs)
    if len(out.logits) != max_new_tokens:
        raise AssertionError(f"transformers stopped after {len(out.logits)} of {max_new_tokens} tokens")
    return out.sequences[0, -max_new_tokens:].tolist(), [torch.log_softmax(s[0].float(), dim=-1) for s in out.logits]


def hf_reference(model_dir: str | Path, input_ids: torch.Tensor, max_new_tokens: int,
                 dtype: torch.dtype = torch.float32) -> tuple[list[int], list[torch.Tensor]]:
    return hf_generate(hf_model(str(model_dir), dtype), input_ids, max_new_tokens)

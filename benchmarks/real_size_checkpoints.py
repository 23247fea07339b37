"""Real-size random checkpoints for `benchmarks/real_size.py`, written once into `CACHE` with little memory.

- `blip2_opt_2_7b()`: BLIP-2 OPT-2.7b's shape (ViT-g/14 at 224 px, 12-layer Q-Former, OPT-2.7b with tied
  embeddings; 3.87 B parameters, 7.7 GB in bfloat16), built by transformers in bfloat16 (never float32: one
  copy, 7.7 GB) and written by its `save_pretrained`, with a word-level tokenizer and BLIP-2's processor.
- `llama_7b()`: a Llama-2-7B-shaped language model (6.74 B parameters, 13.5 GB in bfloat16). Holding it whole
  to call `save_pretrained` would take 13.5 GB on a 24 GiB machine shared with others, so the model is built
  on the meta device (no memory), and each shard that `save_pretrained` would write (same names, same
  `model.safetensors.index.json`) is filled with random numbers and written on its own: at most one shard
  (2 GB) is in memory.

Run the builders under the shared memory lock (`flock /work/bigmem.lock ...`); `real_size.py` does so itself.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks.common import CACHE, word_tokenizer

OPT_VOCAB = 50272
LLAMA_VOCAB = 32000
SHARD_BYTES = 2 << 30  # as save_pretrained's default max_shard_size (2 GB... in GiB, close enough here)


def blip2_opt_2_7b() -> Path:
    out = CACHE / "blip2-opt2.7b-bf16"
    if (out / "processor_config.json").is_file() or (out / "preprocessor_config.json").is_file():  # last
        return out
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tokenizer = word_tokenizer(50265, ["<s>", "<pad>", "</s>", "<unk>"])
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    config = Blip2Config(
        # initializer_range: transformers' ViT default (1e-10) gives all-but-zero weights; real ones are not
        vision_config=dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                           image_size=224, patch_size=14, qkv_bias=True, initializer_range=0.02),
        qformer_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            cross_attention_frequency=2, encoder_hidden_size=1408),
        text_config=dict(model_type="opt", hidden_size=2560, ffn_dim=10240, num_hidden_layers=32,
                         num_attention_heads=32, vocab_size=OPT_VOCAB, max_position_embeddings=2048,
                         word_embed_proj_dim=2560, eos_token_id=2, bos_token_id=2, pad_token_id=1,
                         tie_word_embeddings=True),
        num_query_tokens=32,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
    model.save_pretrained(out)
    del model
    Blip2Processor(BlipImageProcessorPil(size={"height": 224, "width": 224}), tokenizer,
                   num_query_tokens=32).save_pretrained(out)
    return out


def llama_7b() -> Path:
    out = CACHE / "llama-7b-bf16"
    if (out / "model.safetensors.index.json").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=LLAMA_VOCAB, max_position_embeddings=4096,
                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                         dtype="bfloat16", architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:  # transformers' Llama initialisation: normal(0, initializer_range)
                tensors[name] = torch.empty(shapes[name], dtype=torch.bfloat16).normal_(
                    0, config.initializer_range, generator=generator)
            weight_map[name] = file
            total += tensors[name].numel() * 2
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(out)
    tokenizer = word_tokenizer(LLAMA_VOCAB, ["<unk>", "<s>", "</s>"])
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = "<s>", "</s>", "<unk>"
    tokenizer.save_pretrained(out)
    return out

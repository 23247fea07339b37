"""Tiny BLIP-2 configurations, tokenizers and synthetic data shared by the training tests."""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from transformers import Blip2Config

from fovea.training.shapes import generate_shapes, vocabulary
from fovea.training.tokenization import build_opt_tokenizer, build_qformer_tokenizer

CORPUS = [" ".join(vocabulary())] * 4 + [
    "two small red circles and one large blue square on a white background",
    "one large green triangle on an orange background",
    "how many circles are there? what colour is the square? where is the diamond?",
]


@functools.lru_cache(maxsize=None)
def qformer_tokenizer():
    return build_qformer_tokenizer(CORPUS, vocab_size=200)


@functools.lru_cache(maxsize=None)
def opt_tokenizer():
    return build_opt_tokenizer(CORPUS, vocab_size=300)


def tiny_config(*, num_query_tokens: int = 4, image_size: int = 16, patch_size: int = 8, hidden: int = 32,
                num_layers: int = 2, cross_attention_frequency: int = 1, text_input: bool = True,
                dropout: float = 0.0, opt_vocab: int | None = None) -> Blip2Config:
    tok = qformer_tokenizer()
    opt = opt_tokenizer()
    return Blip2Config(
        vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                           num_attention_heads=4, image_size=image_size, patch_size=patch_size),
        qformer_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                            num_attention_heads=4, cross_attention_frequency=cross_attention_frequency,
                            use_qformer_text_input=text_input, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                            max_position_embeddings=32, hidden_dropout_prob=dropout,
                            attention_probs_dropout_prob=dropout),
        text_config=dict(model_type="opt", hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=num_layers,
                         num_attention_heads=4, vocab_size=opt_vocab or (len(opt) + 15) // 16 * 16,
                         max_position_embeddings=64, word_embed_proj_dim=hidden, bos_token_id=opt.bos_token_id,
                         eos_token_id=opt.eos_token_id, pad_token_id=opt.pad_token_id),
        num_query_tokens=num_query_tokens, image_text_hidden_size=16,
    )


def randomize_(module: torch.nn.Module, seed: int, gain: float = 1.5) -> None:
    """Re-draw every parameter far from transformers' near-flat init, so outputs differ per input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif "embed" in name or name == "query_tokens":
                p.copy_(noise)
            elif p.dim() >= 2:
                p.copy_(noise * gain / p[0].numel() ** 0.5)
            else:
                p.copy_(noise * 0.1)


def random_pixels(num: int, image_size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(num, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=None)
def _shapes(folder: str, num: int, seed: int) -> dict[str, Path]:
    return generate_shapes(folder, num, seed=seed, image_size=32)


def shapes_data(folder: Path, num: int = 24, seed: int = 0) -> dict[str, Path]:
    return _shapes(str(folder), num, seed)


def build_opt_dir(folder: Path, hidden: int = 32, num_layers: int = 2, seed: int = 0, gain: float = 2.0) -> Path:
    """A random OPTForCausalLM directory (transformers' save_pretrained) with the tiny OPT tokenizer, which
    already holds the `<image>` placeholder so the vocabulary covers it."""
    from transformers import OPTConfig, OPTForCausalLM

    tok = build_opt_tokenizer(CORPUS, vocab_size=300)
    tok.add_tokens(["<image>"], special_tokens=True)
    config = OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=num_layers, num_attention_heads=4,
                       vocab_size=(len(tok) + 15) // 16 * 16, max_position_embeddings=64, word_embed_proj_dim=hidden,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = OPTForCausalLM(config).eval()
    randomize_(model, seed, gain=gain)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def model_json(path: Path, dropout: float = 0.0, **overrides) -> str:
    """A Blip2Config JSON for a fresh stage-1 model on 32 px images."""
    import json

    config = tiny_config(image_size=32, patch_size=8, dropout=dropout, **overrides)
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "cross_attention_frequency", "max_position_embeddings", "hidden_dropout_prob",
            "attention_probs_dropout_prob")
    values = {"vision_config": config.vision_config.to_dict(),
              "qformer_config": {k: v for k, v in config.qformer_config.to_dict().items() if k in keep},
              "num_query_tokens": config.num_query_tokens, "image_text_hidden_size": 16}
    path.write_text(json.dumps(values))
    return str(path)

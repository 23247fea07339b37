"""LoRA adapters made by PEFT itself on the tiny oracle checkpoints, and the same adapters merged by PEFT.

PEFT initialises B to zero (an adapter that changes nothing); `make_peft_adapter` redraws A and B so that each
adapter moves greedy outputs away from the base model and from the other adapters.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model


def _hf_class(model_dir: str | Path):
    arch = json.loads((Path(model_dir) / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch)


def make_peft_adapter(base_dir: str | Path, out_dir: str | Path, *, target_modules, r: int = 4,
                      lora_alpha: float = 8, use_rslora: bool = False, seed: int = 0, gain: float = 1.0,
                      **options) -> Path:
    """An adapter of `base_dir` with PEFT's `get_peft_model`, random non-zero A and B, saved by PEFT."""
    model = _hf_class(base_dir).from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules, use_rslora=use_rslora,
                        lora_dropout=0.0, **options)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * (gain / param.shape[1] ** 0.5))
    peft_model.save_pretrained(str(out_dir))
    return Path(out_dir)


def merged_checkpoint(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """The base checkpoint (tokenizer and processor files included) with the adapter merged by PEFT's
    `merge_and_unload`: the oracle for requests that run the adapter."""
    out_dir = Path(out_dir)
    shutil.copytree(base_dir, out_dir)
    model = _hf_class(base_dir).from_pretrained(str(base_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out_dir))
    return out_dir

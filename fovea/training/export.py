"""Write trained models as the checkpoint directories transformers' `save_pretrained` writes.

- stage 1 -> `Blip2ForImageTextRetrieval`: config.json, model.safetensors (the model's own names, which are
  transformers'), the Q-Former tokenizer and a `Blip2Processor`. The ITG head and temperature, which
  transformers' class does not have, go to `fovea_training_heads.safetensors` so stage 1 can continue from
  an export; transformers ignores that file.
- stage 2 -> `Blip2ForConditionalGeneration`: the same files with the OPT tokenizer (with its `<image>`
  placeholder) and a processor that puts `num_query_tokens` placeholders before BOS; OPT's packed q/k/v
  projections are written as the separate `q_proj`/`k_proj`/`v_proj` transformers stores. fovea's engine
  (`fovea.LLM`) and transformers both serve the result.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Blip2Config, Blip2Processor, BlipImageProcessorPil

from fovea.multimodal.processors import BlipImageProcessor

TRAINING_HEADS_FILE = "fovea_training_heads.safetensors"
STAGE1_PARTS = ("vision_model", "query_tokens", "embeddings", "qformer", "vision_projection", "text_projection",
                "itm_head")
TRAINING_HEAD_PARTS = ("temp", "lm_head")


def _split_by_part(model: torch.nn.Module, parts: tuple[str, ...]) -> dict[str, torch.Tensor]:
    # every parameter, frozen ones included, tied ones once
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if name.split(".")[0] in parts}


def stage1_state_dict(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(transformers' Blip2ForImageTextRetrieval weights, fovea's training heads)."""
    heads = _split_by_part(model, TRAINING_HEAD_PARTS)
    heads.pop("lm_head.decoder.weight", None)  # tied to embeddings.word_embeddings.weight
    return _split_by_part(model, STAGE1_PARTS), heads


def unpack_opt_weights(language_model: torch.nn.Module, prefix: str = "language_model.") -> dict[str, torch.Tensor]:
    """fovea's OPTForCausalLM parameters under transformers' names: qkv_proj split into q/k/v_proj, and no
    lm_head.weight when it is tied to the input embedding (transformers does not store it then)."""
    out = {}
    for name, param in language_model.named_parameters():
        tensor = param.detach()
        if name == "lm_head.weight" and language_model.tie_word_embeddings:
            continue
        if ".qkv_proj." in name:
            module = language_model.get_submodule(name.rsplit(".qkv_proj.", 1)[0] + ".qkv_proj")
            pieces = tensor.split(list(module.shard_sizes.values()), dim=0)  # output rows, weight and bias alike
            for shard, piece in zip(module.shard_sizes, pieces):
                out[prefix + name.replace(".qkv_proj.", f".{shard}.")] = piece.contiguous()
            continue
        out[prefix + name] = tensor.contiguous()
    return out


def stage2_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = _split_by_part(model, ("vision_model", "query_tokens", "qformer", "language_projection"))
    state.update(unpack_opt_weights(model.language_model))
    return state


def _processor(image_processor: BlipImageProcessor, tokenizer, num_query_tokens: int | None) -> Blip2Processor:
    options = image_processor.to_dict()
    options.pop("image_processor_type")
    return Blip2Processor(image_processor=BlipImageProcessorPil(**options), tokenizer=tokenizer,
                          num_query_tokens=num_query_tokens)


def _write_config(config: Blip2Config, architecture: str, out_dir: Path) -> None:
    config = Blip2Config.from_dict(config.to_dict())
    config.architectures = [architecture]
    config.to_json_file(str(out_dir / "config.json"))


def export_stage1(model: torch.nn.Module, out_dir: str | Path, tokenizer, image_processor: BlipImageProcessor) -> Path:
    """A `Blip2ForImageTextRetrieval` directory from a `Stage1Model`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights, heads = stage1_state_dict(model)
    config = Blip2Config.from_dict(model.config.to_dict())
    config.image_token_index = None  # retrieval texts carry no image placeholders
    _write_config(config, "Blip2ForImageTextRetrieval", out_dir)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    if heads:
        save_file(heads, str(out_dir / TRAINING_HEADS_FILE), metadata={"format": "pt"})
    _processor(image_processor, tokenizer, None).save_pretrained(str(out_dir))
    return out_dir


def export_stage2(model: torch.nn.Module, out_dir: str | Path, tokenizer, image_processor: BlipImageProcessor) -> Path:
    """A `Blip2ForConditionalGeneration` directory from a `Stage2Model`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    _write_config(config, "Blip2ForConditionalGeneration", out_dir)
    save_file(stage2_state_dict(model), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    processor = _processor(image_processor, tokenizer, config.num_query_tokens)
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    if image_token_id != config.image_token_index:
        raise ValueError(f"the tokenizer's <image> is id {image_token_id}, the config says {config.image_token_index}")
    processor.save_pretrained(str(out_dir))
    text = config.text_config
    generation = {"bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id,
                  "pad_token_id": text.pad_token_id}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out_dir

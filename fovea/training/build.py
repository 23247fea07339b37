"""From a `TrainConfig` to what the training loop runs: the model with its weights, the image transform, how
a collated batch becomes model input, the loss, and the export.

Each stage is one `StageSetup`; the loop in `trainer.py` knows nothing particular to either stage.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer, Blip2Config

from fovea.models.weights import load_weights
from fovea.multimodal.processors import BlipImageProcessor
from fovea.training.config import TrainConfig
from fovea.training.data import ImageTextBatch, ImageTextDataset
from fovea.training.export import STAGE1_PARTS, TRAINING_HEADS_FILE, export_stage1, export_stage2
from fovea.training.stage1 import Stage1Batch, Stage1Model
from fovea.training.stage2 import Stage2Batch, Stage2Model, tokenize_stage2
from fovea.training.checkpoint import read_checkpoint_config
from fovea.training.weights import checkpoint_tensor_names, is_qformer_text_branch, load_parts, load_trainable_state

IMAGE_TOKEN = "<image>"


class PixelTransform:
    """PIL image -> (3, H, W) float32 with fovea's BLIP preprocessing (a class, so DataLoader workers can
    pickle it)."""

    def __init__(self, processor: BlipImageProcessor):
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.processor([image])["pixel_values"][0]


@dataclass(slots=True)
class StageSetup:
    model: nn.Module
    """Stage1Model or Stage2Model, weights loaded, frozen parts frozen."""
    image_transform: PixelTransform
    prepare: Callable[[ImageTextBatch], Stage1Batch | Stage2Batch]
    """Collated pairs -> model input (tokenized on the way)."""
    loss: Callable[[nn.Module, Any, torch.Generator], dict[str, torch.Tensor]]
    """(model or its DDP wrapper, prepared batch, ITM generator) -> {"loss": trained quantity, parts...}."""
    export: Callable[[nn.Module, Path], Path]
    """Write the Hugging Face checkpoint directory of the (unwrapped) model."""
    tokenizer: Any
    """Stage 1: the Q-Former's; stage 2: the LLM's (with <image>)."""
    image_processor: BlipImageProcessor


# ---------------------------------------------------------------- shared


def open_dataset(train_data: str, image_root: str | None = None) -> ImageTextDataset:
    """A .jsonl, a Karpathy .json (+ image_root), or tar shards (a path, comma-separated paths, a folder)."""
    paths = [p for p in train_data.split(",") if p]
    if len(paths) == 1 and paths[0].endswith(".jsonl"):
        return ImageTextDataset.from_jsonl(paths[0])
    if len(paths) == 1 and paths[0].endswith(".json"):
        if image_root is None:
            raise ValueError(f"{paths[0]}: a Karpathy-style .json needs image_root")
        return ImageTextDataset.from_karpathy(paths[0], image_root)
    shards = []
    for path in map(Path, paths):
        shards.extend(sorted(path.glob("*.tar")) if path.is_dir() else [path])
    if not shards or not all(str(s).endswith(".tar") for s in shards):
        raise ValueError(f"train_data={train_data!r}: expected a .jsonl, a .json or .tar shards")
    return ImageTextDataset.from_tar_shards(shards)


def _round_up(value: int, multiple: int = 16) -> int:
    return -(-value // multiple) * multiple


def _config_dict(path: str) -> dict[str, Any]:
    """Blip2Config arguments from a JSON file, or from a checkpoint directory's config.json."""
    file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    return json.loads(file.read_text(encoding="utf-8"))


def _vision_config(path: str) -> dict[str, Any]:
    values = _config_dict(path)
    return values["vision_config"] if "vision_config" in values else values


def _image_processor(model_dir: str | None, image_size: int) -> BlipImageProcessor:
    if model_dir is not None:
        try:
            return BlipImageProcessor.from_pretrained(model_dir)
        except (OSError, ValueError):
            pass
    return BlipImageProcessor(size=(image_size, image_size))


def _itm_free_loss(model: nn.Module, batch: Any, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"loss": model(batch).loss}


def _stage1_loss(model: nn.Module, batch: Stage1Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
    out = model(batch, itm_generator=generator)
    return {"loss": out.loss, "itc": out.itc, "itm": out.itm, "itg": out.itg}


# ---------------------------------------------------------------- stage 1


def stage1_config(config: TrainConfig, tokenizer) -> Blip2Config:
    values = _config_dict(config.init_from or config.model_config)
    if config.vision_from:
        values["vision_config"] = _vision_config(config.vision_from)
    qformer = dict(values.get("qformer_config") or {})
    qformer["use_qformer_text_input"] = True
    qformer["pad_token_id"] = tokenizer.pad_token_id
    qformer.setdefault("vocab_size", _round_up(len(tokenizer) + 1))  # + the <image> a Blip2Processor adds
    if qformer["vocab_size"] < len(tokenizer):
        raise ValueError(f"the Q-Former has {qformer['vocab_size']} word embeddings; the tokenizer has "
                         f"{len(tokenizer)} tokens")
    values["qformer_config"] = qformer
    return Blip2Config(**{k: v for k, v in values.items() if k not in ("architectures", "transformers_version")})


def build_stage1(config: TrainConfig) -> StageSetup:
    tokenizer = AutoTokenizer.from_pretrained(config.qformer_tokenizer or config.init_from)
    decoder_token_id = tokenizer.bos_token_id
    if decoder_token_id is None or decoder_token_id in (tokenizer.cls_token_id, tokenizer.pad_token_id):
        raise ValueError("the Q-Former tokenizer needs a [DEC] bos_token distinct from [CLS] and [PAD] "
                         "(see fovea.training.tokenization.build_qformer_tokenizer)")
    blip2 = stage1_config(config, tokenizer)
    torch.manual_seed(config.seed)
    model = Stage1Model(blip2, decoder_token_id=decoder_token_id)
    model.qformer.gradient_checkpointing = config.gradient_checkpointing
    if config.vision_from:
        load_parts(model, config.vision_from, ["vision_model"])
    if config.init_from:
        names = {n.split(".")[0] for n in checkpoint_tensor_names(config.init_from)}
        parts = [p for p in STAGE1_PARTS if p in names and not (p == "vision_model" and config.vision_from)]
        load_parts(model, config.init_from, parts)
        heads = Path(config.init_from) / TRAINING_HEADS_FILE
        if heads.is_file():
            _load_training_heads(model, load_file(str(heads)))
    processor = _image_processor(config.init_from or config.vision_from, blip2.vision_config.image_size)

    def prepare(batch: ImageTextBatch) -> Stage1Batch:
        text = tokenizer(batch.captions, padding="max_length", truncation=True, max_length=config.max_text_len,
                         return_tensors="pt")
        return Stage1Batch(input_ids=text.input_ids, attention_mask=text.attention_mask, image_ids=batch.image_ids,
                           pixel_values=batch.images)

    return StageSetup(model=model, image_transform=PixelTransform(processor), prepare=prepare, loss=_stage1_loss,
                      export=lambda m, out: export_stage1(m, out, tokenizer, processor), tokenizer=tokenizer,
                      image_processor=processor)


def _load_training_heads(model: Stage1Model, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name not in params or params[name].shape != tensor.shape:
                raise ValueError(f"{TRAINING_HEADS_FILE}: {name} {tuple(tensor.shape)} does not fit the model")
            params[name].copy_(tensor)


# ---------------------------------------------------------------- stage 2


def language_model_tokenizer(path: str):
    """The LLM's tokenizer with the `<image>` placeholder (added when missing; it must fit the vocabulary)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tokenizer


def stage2_config(config: TrainConfig, tokenizer) -> tuple[Blip2Config, bool]:
    """(config, whether the LLM's weights sit under `language_model.` in its directory)."""
    lm_values = _config_dict(config.language_model)
    is_blip2_dir = "text_config" in lm_values
    text_config = lm_values["text_config"] if is_blip2_dir else lm_values
    base = _config_dict(config.init_from or config.model_config)
    if config.vision_from:
        base["vision_config"] = _vision_config(config.vision_from)
    qformer = dict(base.get("qformer_config") or {})
    qformer["use_qformer_text_input"] = False
    image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_index >= text_config["vocab_size"]:
        raise ValueError(f"{IMAGE_TOKEN} is token {image_token_index}, past the LLM's vocabulary of "
                         f"{text_config['vocab_size']}; give the LLM a spare row for it")
    text_config = {k: v for k, v in text_config.items() if k not in ("architectures", "transformers_version")}
    blip2 = Blip2Config(vision_config=base.get("vision_config"), qformer_config=qformer, text_config=text_config,
                        num_query_tokens=base.get("num_query_tokens", 32), image_token_index=image_token_index)
    return blip2, is_blip2_dir


def build_stage2(config: TrainConfig) -> StageSetup:
    tokenizer = language_model_tokenizer(config.language_model)
    blip2, is_blip2_dir = stage2_config(config, tokenizer)
    torch.manual_seed(config.seed)
    model = Stage2Model(blip2)
    model.gradient_checkpointing = config.gradient_checkpointing
    if is_blip2_dir:
        load_parts(model, config.language_model, ["language_model"])
    else:
        load_weights(model.language_model, config.language_model)
    if config.vision_from:
        load_parts(model, config.vision_from, ["vision_model"])
    if config.init_from:
        names = {n.split(".")[0] for n in checkpoint_tensor_names(config.init_from)}
        parts = [p for p in ("vision_model", "query_tokens", "qformer", "language_projection")
                 if p in names and not (p == "vision_model" and config.vision_from)]
        load_parts(model, config.init_from, parts, skip=is_qformer_text_branch)
    processor = _image_processor(config.init_from or config.vision_from, blip2.vision_config.image_size)

    def prepare(batch: ImageTextBatch) -> Stage2Batch:
        prompts = [config.prompt if p is None else p for p in (batch.prompts or [None] * len(batch.captions))]
        ids, mask, prompt_lengths = tokenize_stage2(tokenizer, batch.captions, prompts, config.max_text_len)
        return Stage2Batch(input_ids=ids, attention_mask=mask, prompt_lengths=prompt_lengths, pixel_values=batch.images)

    return StageSetup(model=model, image_transform=PixelTransform(processor), prepare=prepare, loss=_itm_free_loss,
                      export=lambda m, out: export_stage2(m, out, tokenizer, processor), tokenizer=tokenizer,
                      image_processor=processor)


def build_setup(config: TrainConfig) -> StageSetup:
    return build_stage1(config) if config.stage == "stage1" else build_stage2(config)


def load_from_checkpoint(checkpoint: str | Path) -> StageSetup:
    """The run's setup rebuilt from a training checkpoint's config, with the checkpoint's trained weights."""
    config = TrainConfig.from_dict(read_checkpoint_config(checkpoint))
    setup = build_setup(config)
    load_trainable_state(setup.model, load_file(str(Path(checkpoint) / "trainable.safetensors")))
    return setup


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write the Hugging Face directory of a training checkpoint (stage 1 or 2, from its saved config)."""
    setup = load_from_checkpoint(checkpoint)
    return setup.export(setup.model.eval(), Path(out_dir))

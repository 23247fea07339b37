"""`TrainConfig`: every option of a stage-1 or stage-2 run, validated in one place.

A run is described by a JSON file (`--config run.json`), flags (`--lr 1e-4`), or both (flags win). Unknown
keys are errors that list the valid ones; each field's default and meaning is documented under it, and the
command line's help is generated from these docstrings.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STAGES = ("stage1", "stage2")


@dataclass(slots=True)
class TrainConfig:
    stage: str
    """"stage1" (ITC + ITM + ITG, frozen ViT) or "stage2" (LM loss through a frozen OPT)."""
    train_data: str
    """Image-text pairs: a .jsonl file, a COCO-Karpathy .json list (with image_root), or webdataset .tar
    shards (one path, a comma-separated list, or a folder of .tar files)."""
    output_dir: str
    """Where checkpoints, metrics.jsonl, loss_curves.png and the final export go."""
    image_root: str | None = None
    """Folder the image paths of a Karpathy-style .json are relative to."""
    model_config: str | None = None
    """JSON file of `Blip2Config` arguments for a fresh model (vision_config, qformer_config, num_query_tokens,
    image_text_hidden_size); not needed when init_from gives the architecture."""
    init_from: str | None = None
    """Checkpoint directory to start from. Stage 1: a Blip2ForImageTextRetrieval directory (continues it).
    Stage 2: the stage-1 export, whose ViT, queries and Q-Former start stage 2."""
    vision_from: str | None = None
    """Directory whose `vision_model.*` weights (and config's vision_config) give the frozen ViT, e.g. any
    BLIP-2 checkpoint. Without it (and without init_from) the ViT is random: for tests only."""
    qformer_tokenizer: str | None = None
    """Stage 1: tokenizer directory of the Q-Former's text branch ([CLS] first; its bos_token is [DEC]).
    Default: the one in init_from."""
    language_model: str | None = None
    """Stage 2: the frozen LLM, an OPTForCausalLM directory or a Blip2ForConditionalGeneration one (its
    language_model.* weights); its tokenizer is used for the text."""
    prompt: str = ""
    """Stage 2: prompt before every caption (masked out of the loss); a record's own "prompt" wins."""
    max_text_len: int = 32
    """Tokens per text (stage 1 pads every text to this, so processes can gather them)."""
    batch_size: int = 32
    """Pairs per process per micro-batch; the global batch is batch_size x processes x grad_accum_steps."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step."""
    max_steps: int = 1000
    """Optimizer steps of the whole run (the schedule's length)."""
    lr: float = 1e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.0
    """Learning rate at the end of the cosine, as a fraction of lr."""
    warmup_steps: int = 100
    """Linear warm-up steps from lr/warmup_steps to lr."""
    weight_decay: float = 0.05
    """AdamW decoupled weight decay on matrices (not biases, norms, embeddings, query tokens)."""
    adam_eps: float = 1e-8
    """AdamW's epsilon. Updates are about lr * g / (|g| + eps): gradients far below eps move weights
    proportionally, not by a full lr step."""
    max_grad_norm: float | None = None
    """Clip the global gradient norm to this; None: no clipping."""
    bf16: bool = False
    """Run forward and backward under bf16 autocast (CPU or GPU); master weights stay float32."""
    gradient_checkpointing: bool = False
    """Recompute Q-Former (and LLM) layer activations in backward: less memory, about 30% more time."""
    seed: int = 0
    """Seeds initialisation, data order, dropout and the ITM negative draws."""
    shuffle: bool = True
    """Shuffle the pairs every epoch (seeded); False keeps the file's order."""
    num_workers: int = 0
    """DataLoader worker processes (0: load in the training process)."""
    threads: int | None = None
    """torch intra-op threads per process; None keeps torch's default (torchrun launches set 1 unless
    OMP_NUM_THREADS says otherwise)."""
    log_every: int = 1
    """Append a line to metrics.jsonl every this many steps."""
    save_every: int = 500
    """Write a resumable checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (the oldest are deleted); 0 keeps all."""
    resume: str | None = None
    """A checkpoint directory to continue from exactly, or "latest" (the newest in output_dir, if any)."""
    stop_at_step: int | None = None
    """End this run after this step (checkpoint written), to continue later with resume."""
    export: bool = True
    """Write the Hugging Face checkpoint (output_dir/export) when the run reaches max_steps."""
    progress: bool = True
    """Show a tqdm progress bar (main process only)."""

    def __post_init__(self) -> None:
        errors = []
        if self.stage not in STAGES:
            errors.append(f"stage={self.stage!r}: choose one of {STAGES}")
        positive = ("max_text_len", "batch_size", "grad_accum_steps", "max_steps", "log_every", "save_every")
        errors += [f"{name}={getattr(self, name)} must be >= 1" for name in positive if getattr(self, name) < 1]
        if self.lr <= 0 or self.weight_decay < 0:
            errors.append(f"lr={self.lr} must be > 0 and weight_decay={self.weight_decay} >= 0")
        if not 0 <= self.warmup_steps <= self.max_steps:
            errors.append(f"warmup_steps={self.warmup_steps} must be in [0, max_steps={self.max_steps}]")
        if self.stop_at_step is not None and not 1 <= self.stop_at_step <= self.max_steps:
            errors.append(f"stop_at_step={self.stop_at_step} must be in [1, max_steps={self.max_steps}]")
        if self.stage == "stage1" and not (self.qformer_tokenizer or self.init_from):
            errors.append("stage 1 needs qformer_tokenizer (or init_from with a tokenizer)")
        if self.stage == "stage1" and not (self.model_config or self.init_from):
            errors.append("stage 1 needs model_config (a fresh model) or init_from")
        if self.stage == "stage2" and not self.language_model:
            errors.append("stage 2 needs language_model (an OPT checkpoint directory)")
        if self.stage == "stage2" and not (self.init_from or self.model_config):
            errors.append("stage 2 needs init_from (the stage-1 export) or model_config")
        if errors:
            raise ValueError("invalid training config: " + "; ".join(errors))

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; valid: {cls.field_names()}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides: Any) -> TrainConfig:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a training config is a JSON object")
        return cls.from_dict({**values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

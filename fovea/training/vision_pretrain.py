"""Pre-train a small BLIP ViT on the synthetic shapes scenes, to be frozen under the Q-Former.

BLIP-2 starts from a ViT that already describes images well (EVA-CLIP). For the shapes world the cheapest
route to such an encoder is supervision from the scene metadata the generator records: from the ViT's final
class token, predict the background colour; for each shape kind its count, colour and size; and for each cell
of the 3x3 grid which shape (if any) sits there. Everything a caption or an answer says is then linearly
readable from the encoder's output, which is what the Q-Former's cross-attention reads.

When the patch grid is the scene's 3x3 grid (e.g. 48 px images, 16 px patches), every patch token is also
taught what its own cell holds (shape, colour, size): each shape lies inside its cell, so the tokens the
Q-Former reads then say, cell by cell, what the picture shows.

The result is saved as a checkpoint directory whose `vision_model.*` weights and `vision_config` any stage
reads with `vision_from` (the names of transformers' Blip2VisionModel inside BLIP-2).

    python -m fovea.training.vision_pretrain --data shapes/train.jsonl --out runs/vision --steps 1500
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import Blip2VisionConfig

from fovea.models.blip2 import BlipVisionModel
from fovea.multimodal.processors import BlipImageProcessor
from fovea.training.optim import build_optimizer, build_scheduler
from fovea.training.shapes import COLOURS, GRID, SHAPES, SIZES

COLOUR_NAMES = list(COLOURS)
SIZE_NAMES = list(SIZES)
MAX_COUNT = 9
IGNORE = -100


@dataclass(slots=True)
class SceneTargets:
    background: torch.Tensor  # (B,) colour index
    counts: torch.Tensor  # (B, kinds) 0..MAX_COUNT
    colours: torch.Tensor  # (B, kinds) colour index, IGNORE when the kind is absent
    sizes: torch.Tensor  # (B, kinds) size index, IGNORE when absent
    cells: torch.Tensor  # (B, GRID * GRID) 0 = empty, 1 + shape index
    cell_colours: torch.Tensor  # (B, GRID * GRID) colour index, IGNORE when the cell is empty
    cell_sizes: torch.Tensor  # (B, GRID * GRID) size index, IGNORE when empty


def scene_targets(scenes: list[dict]) -> SceneTargets:
    num, kinds = len(scenes), len(SHAPES)
    background = torch.tensor([COLOUR_NAMES.index(s["background"]) for s in scenes])
    counts = torch.zeros(num, kinds, dtype=torch.long)
    colours = torch.full((num, kinds), IGNORE)
    sizes = torch.full((num, kinds), IGNORE)
    cells = torch.zeros(num, GRID * GRID, dtype=torch.long)
    cell_colours = torch.full((num, GRID * GRID), IGNORE)
    cell_sizes = torch.full((num, GRID * GRID), IGNORE)
    for i, scene in enumerate(scenes):
        for obj in scene["objects"]:
            k = SHAPES.index(obj["shape"])
            counts[i, k] += 1
            colours[i, k] = cell_colours[i, obj["cell"]] = COLOUR_NAMES.index(obj["colour"])
            sizes[i, k] = cell_sizes[i, obj["cell"]] = SIZE_NAMES.index(obj["size"])
            cells[i, obj["cell"]] = 1 + k
    return SceneTargets(background, counts, colours, sizes, cells, cell_colours, cell_sizes)


def _ce(logits: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, classes), target.reshape(-1), ignore_index=IGNORE)


class SceneHeads(nn.Module):
    """Linear read-outs of the class token (and of the patch tokens, when they are the grid's cells);
    thrown away after pre-training."""

    def __init__(self, dim: int, patches_are_cells: bool):
        super().__init__()
        kinds = len(SHAPES)
        self.patches_are_cells = patches_are_cells
        self.background = nn.Linear(dim, len(COLOURS))
        self.counts = nn.Linear(dim, kinds * (MAX_COUNT + 1))
        self.colours = nn.Linear(dim, kinds * len(COLOURS))
        self.sizes = nn.Linear(dim, kinds * len(SIZES))
        self.cells = nn.Linear(dim, GRID * GRID * (kinds + 1))
        if patches_are_cells:
            self.patch_shape = nn.Linear(dim, kinds + 1)
            self.patch_colour = nn.Linear(dim, len(COLOURS))
            self.patch_size = nn.Linear(dim, len(SIZES))

    def losses(self, tokens: torch.Tensor, t: SceneTargets) -> dict[str, torch.Tensor]:
        # tokens (B, 1 + P, D): the ViT's output, class token first
        cls, kinds = tokens[:, 0], len(SHAPES)
        out = {"background": F.cross_entropy(self.background(cls), t.background),
               "counts": _ce(self.counts(cls), t.counts, MAX_COUNT + 1),
               "colours": _ce(self.colours(cls), t.colours, len(COLOURS)),
               "sizes": _ce(self.sizes(cls), t.sizes, len(SIZES)),
               "cells": _ce(self.cells(cls), t.cells, kinds + 1)}
        if self.patches_are_cells:
            patches = tokens[:, 1:]  # (B, 9, D), row-major like the grid's cells
            out["patch_shape"] = _ce(self.patch_shape(patches), t.cells, kinds + 1)
            out["patch_colour"] = _ce(self.patch_colour(patches), t.cell_colours, len(COLOURS))
            out["patch_size"] = _ce(self.patch_size(patches), t.cell_sizes, len(SIZES))
        return out

    @torch.no_grad()
    def accuracy(self, tokens: torch.Tensor, t: SceneTargets) -> float:
        """Fraction of scenes read entirely right, what an exact caption needs: the background, and every
        cell's shape, colour and size (from the patch tokens when they are the cells, else the class token's
        counts, colours, sizes and cells)."""
        cls, kinds = tokens[:, 0], len(SHAPES)
        right = self.background(cls).argmax(-1) == t.background
        if self.patches_are_cells:
            patches = tokens[:, 1:]
            occupied = t.cells > 0
            right &= (self.patch_shape(patches).argmax(-1) == t.cells).all(-1)
            right &= ((self.patch_colour(patches).argmax(-1) == t.cell_colours) | ~occupied).all(-1)
            right &= ((self.patch_size(patches).argmax(-1) == t.cell_sizes) | ~occupied).all(-1)
            return right.float().mean().item()
        right &= (self.counts(cls).view(-1, kinds, MAX_COUNT + 1).argmax(-1) == t.counts).all(-1)
        present = t.colours != IGNORE
        right &= ((self.colours(cls).view(-1, kinds, len(COLOURS)).argmax(-1) == t.colours) | ~present).all(-1)
        right &= ((self.sizes(cls).view(-1, kinds, len(SIZES)).argmax(-1) == t.sizes) | ~present).all(-1)
        right &= (self.cells(cls).view(-1, GRID * GRID, kinds + 1).argmax(-1) == t.cells).all(-1)
        return right.float().mean().item()


def load_split(path: str | Path, processor: BlipImageProcessor) -> tuple[torch.Tensor, SceneTargets]:
    """All images of a shapes JSONL as pixel values (N, 3, H, W), with their targets (the split is small)."""
    path = Path(path)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    from PIL import Image

    images = []
    for r in records:
        with Image.open(path.parent / r["image"]) as image:
            images.append(image.convert("RGB"))
    pixels = torch.cat([processor(images[i:i + 256])["pixel_values"] for i in range(0, len(images), 256)])
    return pixels, scene_targets([r["scene"] for r in records])


def save_vision_checkpoint(model: BlipVisionModel, config: Blip2VisionConfig, processor: BlipImageProcessor,
                           out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"vision_model.{n}": p.detach().contiguous() for n, p in model.named_parameters()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps({"vision_config": config.to_dict()}, indent=1) + "\n")
    (out_dir / "preprocessor_config.json").write_text(json.dumps(processor.to_dict(), indent=1) + "\n")
    return out_dir


def pretrain_vision(data: str, out_dir: str, steps: int = 1500, batch_size: int = 64, lr: float = 1e-3,
                    hidden: int = 128, layers: int = 4, heads: int = 4, patch: int = 8, image_size: int = 64,
                    seed: int = 0, val_data: str | None = None, bf16: bool = True, log=print) -> dict:
    torch.manual_seed(seed)
    config = Blip2VisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                               num_attention_heads=heads, image_size=image_size, patch_size=patch)
    processor = BlipImageProcessor(size=(image_size, image_size))
    pixels, targets = load_split(data, processor)
    model = BlipVisionModel(config)
    with torch.no_grad():  # the BLIP tables start at zero; a small random start breaks the symmetry
        model.embeddings.position_embedding.normal_(0, 0.02)
        model.embeddings.class_embedding.normal_(0, 0.02)
    heads_ = SceneHeads(hidden, patches_are_cells=(image_size // patch) == GRID)
    both = nn.ModuleDict({"vision_model": model, "heads": heads_})
    optimizer = build_optimizer(both, lr=lr, weight_decay=0.05)
    scheduler = build_scheduler(optimizer, warmup_steps=max(1, steps // 20), total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        index = torch.randint(len(pixels), (batch_size,), generator=generator)
        batch = pixels[index]  # no flips or crops: positions are part of the labels
        t = SceneTargets(*(getattr(targets, f)[index] for f in SceneTargets.__slots__))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            tokens = model(batch)
        losses = heads_.losses(tokens.float(), t)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 100 == 0 or step == steps:
            log(f"vision step {step}/{steps} loss {loss.item():.4f} "
                + " ".join(f"{k} {v.item():.3f}" for k, v in losses.items())
                + f" ({time.perf_counter() - start:.0f} s)")
    model.eval()
    result = {"steps": steps, "seconds": time.perf_counter() - start}
    if val_data:
        val_pixels, val_targets = load_split(val_data, processor)
        with torch.no_grad():
            tokens = torch.cat([model(val_pixels[i:i + 256]) for i in range(0, len(val_pixels), 256)])
        result["val_scene_accuracy"] = heads_.accuracy(tokens, val_targets)
        log(f"vision: every attribute right on {100 * result['val_scene_accuracy']:.1f}% of validation scenes")
    save_vision_checkpoint(model, config, processor, out_dir)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fovea.training.vision_pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="shapes JSONL (with the 'scene' of every record)")
    parser.add_argument("--val-data", default=None, help="shapes JSONL to report scene accuracy on")
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16 autocast (CPU or GPU); float32 master weights")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: small matrices gain little from more and lose a lot on a busy machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = pretrain_vision(args.data, args.out, args.steps, args.batch_size, args.lr, args.hidden, args.layers,
                             args.heads, args.patch, args.image_size, args.seed, args.val_data, args.bf16)
    print(json.dumps(result))
    return 0 if math.isfinite(result["seconds"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())

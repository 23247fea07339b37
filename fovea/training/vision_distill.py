"""Make a ViT robust to the scene size by distilling it into itself: the student reads a scene rendered at any
size (resized to the ViT's input by the BLIP processor, as at serving) and learns to give what the teacher gives
for the same scene rendered at the size it was trained on.

Why: a ViT pre-trained on 48 px scenes only (`vision_pretrain`) reads scenes rendered at other sizes badly. A
64 or 96 px scene resized to 48 px has soft, blended edges and shapes of slightly other sizes and offsets, which
a 48 px rendering (hard edges) never shows; its per-cell read-outs then fail on many scenes (scene accuracy
49-66% at 56-96 px vs 99.6% at 48 px after the demo's 1,500 pre-training steps), and the whole BLIP-2 above it
with them. Pre-training on mixed sizes instead changes the features everything above was trained on (and read
every size worse: 63-79%). Distillation keeps them: the student starts as the teacher and is pulled, token by
token, onto the teacher's output for the scene's own-size rendering (mean squared error over the class and patch
tokens), so the Q-Former and the language model read a large or small scene as they read the scene they were
trained on.

Pairs come from two renderings of the same scenes (same seed and count, `fovea.training.shapes`): the teacher's
view (one size) and the student's (several sizes, scene i at the (i mod n)-th), matched by `image_id`. A share
of every batch (`own_size_fraction`) shows the student the teacher's view, so scenes at the trained size keep
their features.

    python -m fovea.training.vision_distill --teacher runs/vision --data shapes/train.jsonl \\
        --sizes-data shapes-sizes/train.jsonl --out runs/vision-sizes --steps 3000 --lr 1e-3
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
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import Blip2VisionConfig

from fovea.models.blip2 import BlipVisionModel
from fovea.multimodal.processors import BlipImageProcessor
from fovea.training.optim import build_optimizer, build_scheduler
from fovea.training.vision_pretrain import save_vision_checkpoint

VISION_PREFIX = "vision_model."


@dataclass(slots=True)
class PairedViews:
    own: torch.Tensor
    """(N, 3, H, W) pixel values of the teacher's view (the scenes at the size the teacher was trained on)."""
    sizes: torch.Tensor
    """(N, 3, H, W) the same scenes, in the same order, rendered at other sizes and resized by the processor."""
    image_sizes: list[int]
    """Side of each scene's student-view rendering, in pixels."""


def load_teacher(teacher_dir: str | Path) -> tuple[BlipVisionModel, Blip2VisionConfig, BlipImageProcessor]:
    """The ViT of a checkpoint directory: `vision_pretrain`'s output or any BLIP-2 export (its `vision_model.*`
    tensors and `vision_config`), with the image processor saved next to it."""
    teacher_dir = Path(teacher_dir)
    values = json.loads((teacher_dir / "config.json").read_text(encoding="utf-8"))
    config = Blip2VisionConfig(**values.get("vision_config", values))
    model = BlipVisionModel(config)
    tensors = {}
    for file in sorted(teacher_dir.glob("*.safetensors")):
        tensors.update({name[len(VISION_PREFIX):]: t for name, t in load_file(str(file)).items()
                        if name.startswith(VISION_PREFIX)})
    if not tensors:
        raise ValueError(f"{teacher_dir}: no {VISION_PREFIX}* tensors; give vision_pretrain's output or a BLIP-2 "
                         "export")
    model.load_state_dict(tensors, strict=True)
    return model, config, BlipImageProcessor.from_pretrained(teacher_dir)


def _records(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _pixels(path: Path, records: list[dict], processor: BlipImageProcessor) -> torch.Tensor:
    chunks = []
    for start in range(0, len(records), 256):
        images = []
        for r in records[start:start + 256]:
            with Image.open(path.parent / r["image"]) as image:
                images.append(image.convert("RGB"))
        chunks.append(processor(images)["pixel_values"])
    return torch.cat(chunks)


def load_pairs(own_data: str | Path, sizes_data: str | Path, processor: BlipImageProcessor) -> PairedViews:
    """Both renderings of every scene in `own_data`, matched by image_id; a scene missing from `sizes_data`, or
    one whose caption differs there (another seed), is an error."""
    own = _records(own_data)
    by_id = {r["image_id"]: r for r in _records(sizes_data)}
    missing = [r["image_id"] for r in own if r["image_id"] not in by_id]
    if missing:
        raise ValueError(f"{sizes_data}: no rendering of scene(s) {missing[:5]} of {own_data} (same seed and --num?)")
    other = [by_id[r["image_id"]] for r in own]
    differing = [r["image_id"] for r, o in zip(own, other) if r["caption"] != o["caption"]]
    if differing:
        raise ValueError(f"{sizes_data}: scene(s) {differing[:5]} are not the scenes of {own_data} (another seed?)")
    return PairedViews(own=_pixels(Path(own_data), own, processor), sizes=_pixels(Path(sizes_data), other, processor),
                       image_sizes=[int(o.get("image_size", 0)) for o in other])


@torch.no_grad()
def _encode(model: BlipVisionModel, pixels: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(pixels[i:i + 256]) for i in range(0, len(pixels), 256)])


@torch.no_grad()
def mse_by_size(model: BlipVisionModel, views: PairedViews, targets: torch.Tensor) -> dict[int, float]:
    """{side: mean squared error of the model's output on the student view against the teacher's targets}."""
    errors = ((_encode(model, views.sizes) - targets) ** 2).mean(dim=(1, 2))  # (N,)
    sides = torch.tensor(views.image_sizes)
    return {int(s): errors[sides == s].mean().item() for s in sorted(set(views.image_sizes))}


def distill_vision(teacher: str, data: str, sizes_data: str, out_dir: str, steps: int = 1500, batch_size: int = 64,
                   lr: float = 5e-4, own_size_fraction: float = 0.25, seed: int = 0, val_data: str | None = None,
                   val_sizes_data: str | None = None, bf16: bool = True, log=print) -> dict:
    if not 0 <= own_size_fraction < 1:
        raise ValueError(f"own_size_fraction={own_size_fraction}: a fraction in [0, 1)")
    torch.manual_seed(seed)
    teacher_model, config, processor = load_teacher(teacher)
    teacher_model.eval()
    views = load_pairs(data, sizes_data, processor)
    targets = _encode(teacher_model, views.own)  # (N, 1 + P, D) float32: what the student must reproduce
    student = load_teacher(teacher)[0]
    optimizer = build_optimizer(student, lr=lr, weight_decay=0.05)
    scheduler = build_scheduler(optimizer, warmup_steps=max(1, steps // 20), total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    num_own = round(batch_size * own_size_fraction)
    val = None
    if val_data and val_sizes_data:
        val = load_pairs(val_data, val_sizes_data, processor)
        val_targets = _encode(teacher_model, val.own)
        before = mse_by_size(teacher_model, val, val_targets)
        log("teacher's error on other sizes (val): " + ", ".join(f"{s} px {e:.4f}" for s, e in before.items()))
    start = time.perf_counter()
    for step in range(1, steps + 1):
        index = torch.randint(len(targets), (batch_size,), generator=generator)
        pixels = torch.cat([views.own[index[:num_own]], views.sizes[index[num_own:]]])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            tokens = student(pixels)
        loss = F.mse_loss(tokens.float(), targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 100 == 0 or step == steps:
            log(f"distill step {step}/{steps} mse {loss.item():.5f} ({time.perf_counter() - start:.0f} s)")
    student.eval()
    result = {"steps": steps, "seconds": time.perf_counter() - start}
    if val is not None:
        after = mse_by_size(student, val, val_targets)
        own = ((_encode(student, val.own) - val_targets) ** 2).mean().item()
        log("student's error (val): " + ", ".join(f"{s} px {e:.4f}" for s, e in after.items())
            + f"; on the teacher's own view {own:.4f}")
        result["val_mse_before"] = {str(s): e for s, e in before.items()}
        result["val_mse_after"] = {str(s): e for s, e in after.items()}
        result["val_mse_own_view"] = own
    save_vision_checkpoint(student, config, processor, out_dir)
    return result


def replace_vision_model(model_dir: str | Path, vision_dir: str | Path) -> Path:
    """Put the ViT of `vision_dir` (this module's or vision_pretrain's output) into the BLIP-2 checkpoint at
    `model_dir`, in place: its `vision_model.*` tensors are swapped one for one (same names, shapes and dtypes;
    anything else is an error) and every other tensor is kept as it is. Returns the file rewritten."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if len(files) != 1:
        raise ValueError(f"{model_dir}: expected one .safetensors file, found {len(files)}")
    tensors = load_file(str(files[0]))
    vision = {name: t for name, t in load_file(str(Path(vision_dir) / "model.safetensors")).items()
              if name.startswith(VISION_PREFIX)}
    ours = {name for name in tensors if name.startswith(VISION_PREFIX)}
    if set(vision) != ours:
        raise ValueError(f"{vision_dir}: its ViT tensors differ from those of {model_dir} by name: "
                         f"{sorted(set(vision) ^ ours)[:5]}")
    for name, t in vision.items():
        if t.shape != tensors[name].shape or t.dtype != tensors[name].dtype:
            raise ValueError(f"{vision_dir}: {name} is {tuple(t.shape)} {t.dtype}, the checkpoint's is "
                             f"{tuple(tensors[name].shape)} {tensors[name].dtype}")
    tensors.update(vision)
    save_file(tensors, str(files[0]), metadata={"format": "pt"})
    return files[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fovea.training.vision_distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="vision_pretrain's output or a BLIP-2 export")
    parser.add_argument("--data", required=True, help="shapes JSONL at the size the teacher was trained on")
    parser.add_argument("--sizes-data", required=True, help="shapes JSONL of the same scenes at other sizes")
    parser.add_argument("--val-data", default=None, help="validation pairs to report errors on, as --data ...")
    parser.add_argument("--val-sizes-data", default=None, help="... and as --sizes-data")
    parser.add_argument("--out", required=True, help="output checkpoint directory (as vision_pretrain's)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--own-size-fraction", type=float, default=0.25,
                        help="share of each batch shown at the teacher's own size (default: 0.25)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16 autocast for the student; float32 master weights and targets")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        result = distill_vision(args.teacher, args.data, args.sizes_data, args.out, args.steps, args.batch_size,
                                args.lr, args.own_size_fraction, args.seed, args.val_data, args.val_sizes_data,
                                args.bf16)
    except ValueError as e:
        parser.error(str(e))
    print(json.dumps(result))
    return 0 if math.isfinite(result["seconds"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())

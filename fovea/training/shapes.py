"""Synthetic coloured-shape scenes with captions and question/answer pairs: data a tiny BLIP-2 can learn
exactly, for the demo model and for end-to-end tests.

A scene is a background colour and 1..max_groups groups; a group is `count` shapes of one kind, colour and
size. No two groups share a kind or a colour, and no shape has the background's colour, so "the square" and
"the red shape" always name one group. Each shape sits in its own cell of a 3x3 grid (jittered inside
it), which gives every single shape a position name ("top left", ..., "center") and keeps shapes apart.

Everything said about a scene comes from its metadata, in a small closed vocabulary (`vocabulary()`), in a
canonical order (groups in `SHAPES` order), so the caption is a function of the picture:

    "two small red circles and one large blue square on a white background"    (or "on an orange background")

Scenes are rendered at `DEFAULT_IMAGE_SIZE` (48 px, what the shipped demo model takes) or at several sizes
(`image_size=(40, 64, 96)`: scene i at the (i mod 3)-th), the same layout scaled: a model's image processor
resizes them to its input size, as at serving.

Deterministic: scene i of seed s depends only on (s, i) and its size; the split assignment only on
(s, num, splits).
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {  # name -> RGB, far apart so a small vision encoder tells them apart at 40 px
    "red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 190), "orange": (245, 135, 30), "white": (245, 245, 245), "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SIZES = {"small": 0.45, "large": 0.8}  # radius over half a grid cell; < 1 leaves a gap between neighbours
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
GRID = 3
DEFAULT_IMAGE_SIZE = 48
"""Scene side in pixels unless asked otherwise: the size the shipped demo model (demo/blip2-shapes) takes."""
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
"""Name of grid cell row * GRID + column."""
SPLIT_NAMES = ("train", "val", "test")


@dataclass(slots=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    cell: int
    """Grid cell, row * 3 + column; its name is POSITIONS[cell]."""
    center: tuple[int, int]
    """(x, y) in pixels."""
    radius: int
    """Half the shape's width and height in pixels."""


@dataclass(slots=True)
class Scene:
    background: str
    objects: list[ShapeObject]
    """Grouped by shape in SHAPES order; one group per shape kind present."""


def _plural(shape: str, count: int) -> str:
    return shape if count == 1 else shape + "s"


def generate_scene(seed: int, index: int, image_size: int = DEFAULT_IMAGE_SIZE, max_groups: int = 2,
                   max_count: int = 3) -> Scene:
    """Scene `index` of `seed`: the same for the same arguments on every machine (numpy's PCG64 seeded by
    the pair), independent of how many scenes are generated."""
    rng = np.random.default_rng([seed, index])
    colour_names = list(COLOURS)
    background = colour_names[rng.integers(len(colour_names))]
    num_groups = int(rng.integers(1, max_groups + 1))
    shapes = sorted(rng.choice(len(SHAPES), size=num_groups, replace=False))  # canonical (SHAPES) order
    shape_colours = [c for c in colour_names if c != background]
    colours = rng.choice(len(shape_colours), size=num_groups, replace=False)
    counts = rng.integers(1, max_count + 1, size=num_groups)
    sizes = rng.integers(len(SIZES), size=num_groups)
    cells = rng.permutation(GRID * GRID)[: int(counts.sum())]
    cell_size = image_size / GRID
    objects, next_cell = [], 0
    for shape, colour, count, size in zip(shapes, colours, counts, sizes):
        size_name = list(SIZES)[size]
        radius = max(2, round(SIZES[size_name] * cell_size / 2))
        for _ in range(int(count)):
            cell = int(cells[next_cell])
            next_cell += 1
            row, column = divmod(cell, GRID)
            jitter = max(0, int(cell_size / 2 - radius) - 1)  # keeps the shape inside its cell
            dx, dy = rng.integers(-jitter, jitter + 1, size=2)
            center = (int((column + 0.5) * cell_size) + int(dx), int((row + 0.5) * cell_size) + int(dy))
            objects.append(ShapeObject(shape=SHAPES[shape], colour=shape_colours[colour], size=size_name,
                                       cell=cell, center=center, radius=radius))
    return Scene(background=background, objects=objects)


def render_scene(scene: Scene, image_size: int = DEFAULT_IMAGE_SIZE) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x, y, r = *obj.center, obj.radius
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif obj.shape == "square":
            draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
        elif obj.shape == "diamond":
            draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}; known: {', '.join(SHAPES)}")
    return image


def _groups(scene: Scene) -> list[tuple[ShapeObject, int]]:
    """(first object, count) per group, in scene (canonical) order."""
    groups: dict[str, list[ShapeObject]] = {}
    for obj in scene.objects:
        groups.setdefault(obj.shape, []).append(obj)
    return [(objs[0], len(objs)) for objs in groups.values()]


def caption_scene(scene: Scene) -> str:
    parts = [f"{NUMBER_WORDS[count]} {obj.size} {obj.colour} {_plural(obj.shape, count)}"
             for obj, count in _groups(scene)]
    article = "an" if scene.background[0] in "aeiou" else "a"
    return f"{' and '.join(parts)} on {article} {scene.background} background"


def question_answers(scene: Scene, seed: int, index: int) -> list[dict[str, str]]:
    """Questions whose answers the picture determines, each {"question", "answer", "type"}; answers are one
    word except positions ("top left")."""
    rng = np.random.default_rng([seed, index, 1])
    qa = []

    def ask(question: str, answer: str, kind: str) -> None:
        qa.append({"question": question, "answer": answer, "type": kind})

    groups = _groups(scene)
    for obj, count in groups:
        things, verb = _plural(obj.shape, count), "is" if count == 1 else "are"
        ask(f"how many {obj.shape}s are there?", NUMBER_WORDS[count], "count")
        ask(f"what colour {verb} the {things}?", obj.colour, "colour")
        ask(f"what size {verb} the {things}?", obj.size, "size")
        ask(f"which shape is {obj.colour}?", obj.shape, "shape")
        ask(f"is there a {obj.colour} {obj.shape}?", "yes", "exists")
        if count == 1:
            ask(f"where is the {obj.shape}?", POSITIONS[obj.cell], "position")
    present = {obj.shape for obj, _ in groups}
    absent = [shape for shape in SHAPES if shape not in present]
    if absent:
        shape = absent[rng.integers(len(absent))]
        ask(f"how many {shape}s are there?", "zero", "count")
        ask(f"is there a {groups[0][0].colour} {shape}?", "no", "exists")
    ask("what colour is the background?", scene.background, "background")
    ask("how many shapes are there?", NUMBER_WORDS[len(scene.objects)], "total")
    return qa


def vocabulary() -> list[str]:
    """Every word a caption, question or answer can use (lower case; "?" is written after the last word)."""
    words = set(NUMBER_WORDS) | set(SIZES) | set(COLOURS) | set(SHAPES) | {s + "s" for s in SHAPES}
    words |= {w for position in POSITIONS for w in position.split()}
    words |= set("and on a an background how many are there what colour is the size which shape where yes no"
                 .split())
    words |= {"shapes"}
    return sorted(words)


def _split_sizes(num: int, splits: tuple[float, float, float]) -> list[int]:
    if len(splits) != 3 or min(splits) < 0 or abs(sum(splits) - 1.0) > 1e-6:
        raise ValueError(f"splits={splits!r}: three non-negative fractions (train, val, test) summing to 1")
    num_train, num_val = round(num * splits[0]), round(num * splits[1])
    return [num_train, num_val, num - num_train - num_val]


def generate_shapes(out_dir: str | Path, num: int, seed: int = 0,
                    image_size: int | Sequence[int] = DEFAULT_IMAGE_SIZE,
                    splits: tuple[float, float, float] = (0.8, 0.1, 0.1), max_groups: int = 2,
                    max_count: int = 3) -> dict[str, Path]:
    """Render `num` scenes into out_dir/images/NNNNNN.png and write train.jsonl, val.jsonl, test.jsonl (one
    record per image: image (relative path), caption, image_id (the scene index), qa, scene, image_size) and
    meta.json (the arguments and the vocabulary). Returns {split name: JSONL path}.

    `image_size`: one side in pixels, or several: scene i is rendered at image_size[i % len(image_size)]."""
    image_sizes = (image_size,) if isinstance(image_size, int) else tuple(image_size)
    if num < 1 or not image_sizes or any(not isinstance(px, int) or px < 4 * GRID for px in image_sizes):
        raise ValueError(f"num={num} must be >= 1 and image_size={image_size} one or more ints >= {4 * GRID}")
    if not 1 <= max_groups <= len(SHAPES) or max_count < 1 or max_groups * max_count > GRID * GRID:
        raise ValueError(f"max_groups={max_groups} must be in [1, {len(SHAPES)}], max_count={max_count} >= 1, "
                         f"and max_groups * max_count <= {GRID * GRID} (one shape per grid cell)")
    sizes = _split_sizes(num, tuple(splits))
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng([seed, num]).permutation(num)
    split_of = np.empty(num, dtype=np.int64)
    split_of[order] = np.repeat(np.arange(3), sizes)
    records: list[list[str]] = [[], [], []]
    for index in range(num):
        side = image_sizes[index % len(image_sizes)]
        scene = generate_scene(seed, index, side, max_groups, max_count)
        relative = f"images/{index:06d}.png"
        render_scene(scene, side).save(out_dir / relative)
        record = {"image": relative, "caption": caption_scene(scene), "image_id": index,
                  "qa": question_answers(scene, seed, index), "scene": asdict(scene), "image_size": side}
        records[split_of[index]].append(json.dumps(record))
    paths = {}
    for name, lines in zip(SPLIT_NAMES, records):
        paths[name] = out_dir / f"{name}.jsonl"
        paths[name].write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    meta = {"num": num, "seed": seed, "image_size": image_sizes[0] if len(image_sizes) == 1 else list(image_sizes),
            "splits": list(splits), "max_groups": max_groups,
            "max_count": max_count, "split_sizes": dict(zip(SPLIT_NAMES, sizes)), "vocabulary": vocabulary()}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return paths


def parse_image_sizes(text: str) -> tuple[int, ...]:
    """"48" or "40,48,64,96" -> (48,) or (40, 48, 64, 96): sides in pixels, each at least 4 per grid cell."""
    try:
        sizes = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 4 * GRID:
        raise argparse.ArgumentTypeError(f"{text!r}: one or more comma-separated sides in pixels, each >= {4 * GRID}")
    return sizes


def _parse_splits(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
        _split_sizes(1, values)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: three comma-separated fractions summing to 1 ({e})")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fovea data shapes",
        description="Render synthetic coloured-shape scenes with captions and question/answer pairs, split "
                    "into train/val/test JSONL files.")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (required)")
    parser.add_argument("--num", type=int, default=1000, metavar="N", help="number of images (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default: 0)")
    parser.add_argument("--image-size", type=parse_image_sizes, default=(DEFAULT_IMAGE_SIZE,), metavar="PX[,PX...]",
                        help="image width and height in pixels (demo/blip2-shapes takes 48); several, comma-"
                             "separated, render scene i at the (i mod n)-th, e.g. 40,48,64,96 "
                             f"(default: {DEFAULT_IMAGE_SIZE})")
    parser.add_argument("--splits", type=_parse_splits, default=(0.8, 0.1, 0.1), metavar="TRAIN,VAL,TEST",
                        help="fractions of images per split (default: 0.8,0.1,0.1)")
    parser.add_argument("--max-groups", type=int, default=2,
                        help="most shape kinds in one image (default: 2)")
    parser.add_argument("--max-count", type=int, default=3, help="most shapes of one kind (default: 3)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        sizes = args.image_size
        paths = generate_shapes(args.out, args.num, args.seed, image_size=sizes[0] if len(sizes) == 1 else sizes,
                                splits=args.splits, max_groups=args.max_groups, max_count=args.max_count)
    except ValueError as e:
        parser.error(str(e))
    counts = {name: sum(1 for _ in path.open(encoding="utf-8")) for name, path in paths.items()}
    print(f"wrote {args.num} images to {args.out}: " + ", ".join(f"{n} {name}" for name, n in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`make demo`: caption example images and answer a question about one, with fovea's offline API.

Until fovea ships its own trained demo model (issue 5), this builds a tiny BLIP-2 with random weights on
the spot (with transformers, as a set-up step only; serving uses fovea's own code), so the text it prints is
noise: what it demonstrates is the pipeline, from images and prompts to RequestOutputs.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def example_images() -> dict[str, Image.Image]:
    scenes = {
        "red-circle.png": ("white", [("ellipse", (20, 20, 90, 90), "red")]),
        "two-blue-squares.png": ("lightyellow", [("rectangle", (10, 30, 50, 70), "blue"),
                                                 ("rectangle", (70, 40, 110, 80), "blue")]),
        "green-triangle.png": ("black", [("polygon", [(60, 10), (110, 100), (10, 100)], "green")]),
    }
    out = {}
    for name, (background, shapes) in scenes.items():
        img = Image.new("RGB", (120, 120), background)
        draw = ImageDraw.Draw(img)
        for kind, geometry, colour in shapes:
            getattr(draw, kind)(geometry, fill=colour)
        out[name] = img
    return out


def main() -> None:
    from fovea import LLM, SamplingParams
    from tests.oracle.blip2 import build_tiny_blip2

    model_dir = ROOT / "runs" / "demo-model"
    if not (model_dir / "model.safetensors").exists():
        print(f"building a tiny random BLIP-2 stand-in in {model_dir} ...")
        build_tiny_blip2(model_dir, seed=0)
    llm = LLM(str(model_dir), dtype="float32")
    images = example_images()
    prompts = [{"prompt": "a photo of", "multi_modal_data": {"image": img}} for img in images.values()]
    prompts.append({"prompt": "Question: how many squares are there? Answer:",
                    "multi_modal_data": {"image": images["two-blue-squares.png"]}})
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12))
    seconds = time.perf_counter() - start
    for name, out in zip([*images, "two-blue-squares.png"], outs):
        print(f"{name:22s} {out.prompt!r:50s} -> {out.outputs[0].text!r} ({out.outputs[0].finish_reason})")
    print(f"{len(outs)} requests in {seconds:.2f} s (random weights: the words are noise until the trained demo model lands)")


if __name__ == "__main__":
    main()

"""Shared inputs for the BLIP-2 end-to-end tests: images of varied sizes and prompts of varied lengths."""
from __future__ import annotations

import numpy as np
from PIL import Image

PROMPTS = [
    "Question: how many cats are there? Answer:",
    "a photo of",
    "",
    "Question: what colour is the large shape in the middle of the picture? Answer:",
    "describe",
    "the dog and the cat are sitting on a red sofa next to",
    "Question: is it raining? Answer:",
    "an old photograph showing",
]
SIZES = [(30, 30), (64, 48), (17, 95), (200, 120), (33, 33), (120, 300), (8, 8), (75, 61)]
MAX_TOKENS = [12, 7, 15, 5, 10, 9, 14, 6]


def make_image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    # smooth gradients plus noise: realistic enough that resizing matters
    base = np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.2, 1.0, (1, 1, 3))
    noise = rng.integers(0, 60, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def cases(num: int = 8):
    return [(PROMPTS[i], make_image(100 + i, SIZES[i]), MAX_TOKENS[i]) for i in range(num)]

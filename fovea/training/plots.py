"""Loss curves from metrics.jsonl to a PNG, drawn with Pillow (no plotting library needed).

One panel per metric (loss, then its parts, then the learning rate), steps on x, the metric's range on y with
its min and max written at the ends of the axis; a faint raw line and a bold moving average.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

PANEL_W, PANEL_H, MARGIN = 360, 200, 44
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
SKIPPED = {"step", "epoch", "samples_per_s", "elapsed_s", "samples"}


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _panel(draw: ImageDraw.ImageDraw, left: int, top: int, name: str, steps: list[int], values: list[float],
           colour: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = left + MARGIN, top + 20, left + PANEL_W - 10, top + PANEL_H - 24
    draw.rectangle([x0, y0, x1, y1], outline=(160, 160, 160))
    draw.text((left + MARGIN, top + 4), name, fill=(0, 0, 0))
    finite = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    if not finite:
        return
    lo, hi = min(v for _, v in finite), max(v for _, v in finite)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    first, last = finite[0][0], finite[-1][0]
    span = max(1, last - first)

    def point(step: int, value: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * (step - first) / span, y1 - (y1 - y0) * (value - lo) / (hi - lo)

    digits = next((d for d in range(3, 8) if f"{hi:.{d}g}" != f"{lo:.{d}g}"), 8)
    draw.text((left + 2, y0 - 4), f"{hi:.{digits}g}", fill=(80, 80, 80))
    draw.text((left + 2, y1 - 8), f"{lo:.{digits}g}", fill=(80, 80, 80))
    draw.text((x0, y1 + 4), str(first), fill=(80, 80, 80))
    draw.text((x1 - 6 * len(str(last)), y1 + 4), str(last), fill=(80, 80, 80))
    faint = tuple(int(c + (255 - c) * 0.65) for c in colour)
    raw = [point(s, v) for s, v in finite]
    smooth = [point(s, v) for (s, _), v in zip(finite, _moving_average([v for _, v in finite],
                                                                        max(1, len(finite) // 20)))]
    if len(raw) > 1:
        draw.line(raw, fill=faint, width=1)
        draw.line(smooth, fill=colour, width=2)
    else:
        draw.ellipse([raw[0][0] - 2, raw[0][1] - 2, raw[0][0] + 2, raw[0][1] + 2], fill=colour)


def plot_metrics(metrics_path: str | Path, out_path: str | Path, columns: int = 2) -> Path | None:
    """Draw every numeric metric of metrics.jsonl; returns the PNG path (None when there is nothing yet)."""
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    names = []
    for row in rows:
        for key, value in row.items():
            if key not in SKIPPED and isinstance(value, (int, float)) and key not in names:
                names.append(key)
    names.sort(key=lambda n: (n != "loss", n == "lr", n))
    num_rows = -(-len(names) // columns)
    image = Image.new("RGB", (PANEL_W * columns, PANEL_H * num_rows), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for i, name in enumerate(names):
        points = [(row["step"], float(row[name])) for row in rows if name in row]
        left, top = (i % columns) * PANEL_W, (i // columns) * PANEL_H
        _panel(draw, left, top, name, [s for s, _ in points], [v for _, v in points], COLOURS[i % len(COLOURS)])
    out_path = Path(out_path)
    image.save(out_path)
    return out_path

"""Evaluation records from JSONL files (the shapes generator's split files, or any file of the same shape).

One JSON object per line with "image" (a path, relative to the file's folder), and, as the task needs:
"caption" (a string or a list of references), "image_id" (captions of one image share it; default: the
image path), "qa" (a list of {"question", "answer" (a string or a list of human answers), "type"}) or
top-level "question" / "answer" for one question per line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image


@dataclass(slots=True)
class EvalImage:
    path: str
    image_id: str
    captions: list[str] = field(default_factory=list)
    questions: list[dict] = field(default_factory=list)
    """{"question": str, "answers": list[str], "type": str}"""

    def load(self) -> Image.Image:
        with Image.open(self.path) as image:
            return image.convert("RGB")


def read_eval_images(path: str | Path, max_images: int | None = None) -> list[EvalImage]:
    """The file's images in order of first appearance, each with all its captions and questions."""
    path = Path(path)
    by_id: dict[str, EvalImage] = {}
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        entry = json.loads(line)
        if "image" not in entry:
            raise ValueError(f"{path}:{line_number}: no 'image'")
        image_path = str(path.parent / entry["image"])
        image_id = str(entry.get("image_id", image_path))
        item = by_id.get(image_id)
        if item is None:
            if max_images is not None and len(by_id) >= max_images:
                continue
            item = by_id[image_id] = EvalImage(path=image_path, image_id=image_id)
        captions = entry.get("caption", [])
        item.captions.extend([captions] if isinstance(captions, str) else captions)
        qa = list(entry.get("qa", []))
        if "question" in entry:
            qa.append({"question": entry["question"], "answer": entry["answer"], "type": entry.get("type", "")})
        for q in qa:
            answers = q["answer"] if isinstance(q["answer"], list) else [q["answer"]]
            item.questions.append({"question": q["question"], "answers": answers, "type": q.get("type", "")})
    if not by_id:
        raise ValueError(f"{path}: no records")
    return list(by_id.values())

"""Dummy inputs: the worst case a model can be asked to run, used to size memory before serving."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image


@dataclass(slots=True)
class ProcessorInputs:
    prompt: str
    mm_data: dict[str, list[Any]]


class BaseDummyInputsBuilder(ABC):
    def __init__(self, info: Any):
        self.info = info

    @abstractmethod
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        """Prompt text holding a placeholder for each item (empty when the processor inserts them)."""

    @abstractmethod
    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int]) -> dict[str, list[Any]]:
        """Items of the size that produces the most tokens."""

    def get_dummy_processor_inputs(self, seq_len: int, mm_counts: Mapping[str, int]) -> ProcessorInputs:
        """The worst-case prompt and items; a modality asked for 0 times is left out of both."""
        counts = {modality: count for modality, count in mm_counts.items() if count > 0}
        data = self.get_dummy_mm_data(seq_len, counts) if counts else {}
        return ProcessorInputs(self.get_dummy_text(counts), data)

    @staticmethod
    def _get_dummy_images(*, width: int, height: int, num_images: int) -> list[Image.Image]:
        # noise rather than a flat colour, so nothing downstream can shortcut the work
        rng = np.random.default_rng(0)
        return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(num_images)]

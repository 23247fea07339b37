"""What the engine may ask of a model beyond `forward(input_ids, positions, inputs_embeds)`."""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@runtime_checkable
class TextGenerationModel(Protocol):
    """Every fovea model: a causal LM over the engine's flat batch."""

    def get_text_config(self) -> "PretrainedConfig": ...

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        mm_embeds: list[torch.Tensor] | None = None,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def forward(
        self, input_ids: torch.Tensor | None, positions: torch.Tensor, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor: ...

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class SupportsMultiModal(TextGenerationModel, Protocol):
    """A model with encoders whose outputs replace placeholder tokens' embeddings.

    `embed_multimodal(**mm_kwargs)` returns one [num_rows, hidden] tensor per item; `embed_input_ids` merges
    them, in order, into the positions where `is_multimodal` is True.
    """

    supports_multimodal: ClassVar[bool]

    def embed_multimodal(self, **mm_kwargs: torch.Tensor | None) -> list[torch.Tensor]: ...


def supports_multimodal(model: object) -> bool:
    return bool(getattr(model, "supports_multimodal", False))

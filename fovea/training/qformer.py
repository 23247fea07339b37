"""The Q-Former's training heads: text embeddings (the text branch's input) and the ITG language-model head.

The Q-Former itself is the serving one, `fovea.models.blip2_qformer.Blip2QFormerModel`, built with its text
branch and dropout for training; the stages put these heads around it. `QFormerTextEmbeddings` (serving's too:
InstructBLIP embeds its instruction with it, so it lives in `blip2_qformer`) has transformers'
`Blip2TextEmbeddings` names (`word_embeddings`, `position_embeddings`), so a stage-1 model saves as a
`Blip2ForImageTextRetrieval` checkpoint without renaming. The ITG head (`QFormerLMHead`) has no
counterpart in transformers and is left out of exports.

Shapes: B batch, T text tokens, D hidden size, V the Q-Former vocabulary.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig

from fovea.layers.activations import get_activation
from fovea.models.blip2_qformer import QFormerTextEmbeddings

__all__ = ["QFormerLMHead", "QFormerTextEmbeddings"]


class QFormerLMHead(nn.Module):
    """BERT's prediction head for ITG: dense -> activation -> LayerNorm -> decoder to the vocabulary. The
    decoder's weight is the word embedding table (tied, as in BLIP-2), its bias is its own."""

    def __init__(self, config: Blip2QFormerConfig, word_embeddings: nn.Embedding | None = None):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = get_activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        if word_embeddings is not None:
            self.decoder.weight = word_embeddings.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, V)
        return self.decoder(self.LayerNorm(self.act(self.dense(x))))

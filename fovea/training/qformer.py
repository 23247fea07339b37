"""The Q-Former's training heads: text embeddings (the text branch's input) and the ITG language-model head.

The Q-Former itself is the serving one, `fovea.models.blip2_qformer.Blip2QFormerModel`, built with its text
branch and dropout for training; the stages put these heads around it. `QFormerTextEmbeddings` has
transformers' `Blip2TextEmbeddings` names (`word_embeddings`, `position_embeddings`), so a stage-1 model saves
as a `Blip2ForImageTextRetrieval` checkpoint without renaming. The ITG head (`QFormerLMHead`) has no
counterpart in transformers and is left out of exports.

Shapes: B batch, T text tokens, D hidden size, V the Q-Former vocabulary.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig

from fovea.layers.activations import get_activation


class QFormerTextEmbeddings(nn.Module):
    """Word + absolute position embeddings of the text (positions from 0); the Q-Former's own `layernorm`
    normalises them, as it does the queries."""

    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, D)
        length = input_ids.shape[1]
        if length > self.position_embeddings.num_embeddings:
            raise ValueError(f"text of {length} tokens; the Q-Former has {self.position_embeddings.num_embeddings} "
                             "positions")
        positions = torch.arange(length, device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]


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

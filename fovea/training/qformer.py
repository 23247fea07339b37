"""The Q-Former with its text branch, for training: one BERT-style stack shared by learned queries and text.

The inference model (`fovea.models.blip2`) runs only the query branch. Training also runs text through the
same layers, which is what makes the three stage-1 losses possible:

- queries alone (image features, ITC): queries self-attend, cross-attend to the frozen ViT's patches every
  `cross_attention_frequency` layers, then go through the *query* feed-forward;
- text alone (text features, ITC): self-attention over the text (padding masked), the *text* feed-forward,
  no cross-attention;
- queries and text together (ITM): one self-attention over [queries, text], both directions; queries still
  cross-attend and use their own feed-forward, text uses its own;
- text decoding (ITG): text attends causally to itself and to all queries, queries never see the text. As in
  BLIP-2, the queries' keys and values come from the query-only pass: `QFormer.decode` takes the query rows
  that entered each layer (`layer_inputs` of `forward`), so queries are not run twice.

Parameter names equal transformers' `Blip2QFormerModel` (`layernorm`, `encoder.layer.N.attention.attention.
query`, ..., `intermediate_query`, `output_query`, and `intermediate`/`output` for the text branch) and its
`Blip2TextEmbeddings` (`word_embeddings`, `position_embeddings`), so a stage-1 model saves as a
`Blip2ForImageTextRetrieval` checkpoint without renaming. The ITG head (`QFormerLMHead`) has no counterpart
in transformers and is left out of exports.

Shapes: B batch, Q queries, T text tokens, L = Q + T, P image patches (+1 class token), D hidden size,
Dv the vision encoder's width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Blip2QFormerConfig

from fovea.layers.activations import get_activation
from fovea.models.blip2 import QFormerIntermediate


def as_sdpa_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A boolean "may attend" mask for SDPA, broadcastable to (B, heads, rows, keys).

    (B, keys) marks real keys (1) and padding (0), the same for every row; (B, rows, keys) is a full pattern
    such as `fovea.training.losses.itg_attention_mask`; None attends everywhere.
    """
    if mask is None:
        return None
    if mask.dim() == 2:
        return mask.bool()[:, None, None, :]
    if mask.dim() == 3:
        return mask.bool()[:, None]
    raise ValueError(f"attention mask must be (B, keys) or (B, rows, keys); got {tuple(mask.shape)}")


class QFormerProjections(nn.Module):
    """query/key/value projections and the attention itself; keys and values may come from another input
    (the image patches for cross-attention, [cached queries, text] for decoding)."""

    def __init__(self, config: Blip2QFormerConfig, is_cross_attention: bool):
        super().__init__()
        dim = config.hidden_size
        if dim % config.num_attention_heads:
            raise ValueError(f"hidden_size {dim} is not a multiple of num_attention_heads {config.num_attention_heads}")
        kv_dim = config.encoder_hidden_size if is_cross_attention else dim
        self.num_heads = config.num_attention_heads
        self.head_dim = dim // self.num_heads
        self.dropout_p = config.attention_probs_dropout_prob
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(kv_dim, dim)
        self.value = nn.Linear(kv_dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, rows, dim = x.shape
        q = self.query(x).view(batch, rows, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, rows, hs)
        k = self.key(context).view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, keys, hs)
        v = self.value(context).view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5,
                                             dropout_p=self.dropout_p if self.training else 0.0)
        return out.transpose(1, 2).reshape(batch, rows, dim)


class QFormerResidual(nn.Module):
    """BERT's post-norm residual: LayerNorm(dropout(dense(x)) + residual)."""

    def __init__(self, config: Blip2QFormerConfig, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class QFormerAttention(nn.Module):
    def __init__(self, config: Blip2QFormerConfig, is_cross_attention: bool = False):
        super().__init__()
        self.attention = QFormerProjections(config, is_cross_attention)
        self.output = QFormerResidual(config, config.hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.attention(x, x if context is None else context, mask), x)


class QFormerLayer(nn.Module):
    def __init__(self, config: Blip2QFormerConfig, layer_idx: int, has_text_branch: bool):
        super().__init__()
        self.attention = QFormerAttention(config)
        self.has_cross_attention = layer_idx % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = QFormerAttention(config, is_cross_attention=True)
        self.has_text_branch = has_text_branch
        if has_text_branch:
            self.intermediate = QFormerIntermediate(config)
            self.output = QFormerResidual(config, config.intermediate_size)
        self.intermediate_query = QFormerIntermediate(config)
        self.output_query = QFormerResidual(config, config.intermediate_size)

    def forward(self, x: torch.Tensor, num_query: int, mask: torch.Tensor | None,
                image_embeds: torch.Tensor | None) -> torch.Tensor:
        # x (B, L, D): the first num_query rows are queries, the rest text
        x = self.attention(x, mask=mask)
        queries, text = x[:, :num_query], x[:, num_query:]
        parts = []
        if num_query:
            if self.has_cross_attention:
                if image_embeds is None:
                    raise ValueError("queries need image_embeds: this layer cross-attends to the image")
                queries = self.crossattention(queries, context=image_embeds)
            parts.append(self.output_query(self.intermediate_query(queries), queries))
        if text.shape[1]:
            parts.append(self._text_feed_forward(text))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def decode(self, text: torch.Tensor, query_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # text (B, T, D) attends to [query_states (B, Q, D), text] under mask (B, 1, T, Q + T)
        x = self.attention(text, context=torch.cat([query_states, text], dim=1), mask=mask)
        return self._text_feed_forward(x)

    def _text_feed_forward(self, text: torch.Tensor) -> torch.Tensor:
        if not self.has_text_branch:
            raise ValueError("this Q-Former has no text branch (use_qformer_text_input=False)")
        return self.output(self.intermediate(text), text)


class QFormerEncoder(nn.Module):
    def __init__(self, config: Blip2QFormerConfig, has_text_branch: bool):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(config, i, has_text_branch) for i in range(config.num_hidden_layers))


class QFormer(nn.Module):
    """The shared stack (transformers' `Blip2QFormerModel`). Inputs are embeddings: learned queries, text
    embeddings (`QFormerTextEmbeddings`), or both concatenated as [queries, text]."""

    def __init__(self, config: Blip2QFormerConfig, has_text_branch: bool | None = None):
        super().__init__()
        self.config = config
        self.has_text_branch = config.use_qformer_text_input if has_text_branch is None else has_text_branch
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.encoder = QFormerEncoder(config, self.has_text_branch)
        self.gradient_checkpointing = False

    def _call(self, fn, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, embeds: torch.Tensor, num_query: int, attention_mask: torch.Tensor | None = None,
                image_embeds: torch.Tensor | None = None,
                layer_inputs: list[torch.Tensor] | None = None) -> torch.Tensor:
        """embeds (B, L, D) -> (B, L, D).

        attention_mask: (B, L) real/padding or (B, L, L) "may attend" (see `as_sdpa_mask`); None: all.
        image_embeds (B, P, Dv): what the queries cross-attend to (needed when num_query > 0).
        layer_inputs: if a list, the query rows entering each layer (B, Q, D) are appended to it, for `decode`.
        """
        x = self.dropout(self.layernorm(embeds))
        mask = as_sdpa_mask(attention_mask)
        for layer in self.encoder.layer:
            if layer_inputs is not None:
                layer_inputs.append(x[:, :num_query])
            x = self._call(layer, x, num_query, mask, image_embeds)
        return x

    def decode(self, text_embeds: torch.Tensor, query_layer_inputs: list[torch.Tensor],
               attention_mask: torch.Tensor) -> torch.Tensor:
        """Text rows of the ITG pass: text_embeds (B, T, D) -> (B, T, D).

        query_layer_inputs: per layer, the query rows (B, Q, D) that entered it in the query-only pass.
        attention_mask: (B, T, Q + T), the text rows of `itg_attention_mask` (True = may attend).
        Equal to the text rows of `forward` on [queries, text] with the full ITG mask, because there the
        queries see no text and so enter every layer exactly as in the query-only pass.
        """
        if len(query_layer_inputs) != len(self.encoder.layer):
            raise ValueError(f"need the query rows entering each of {len(self.encoder.layer)} layers, "
                             f"got {len(query_layer_inputs)}")
        x = self.dropout(self.layernorm(text_embeds))
        mask = as_sdpa_mask(attention_mask)
        for layer, queries in zip(self.encoder.layer, query_layer_inputs):
            x = self._call(layer.decode, x, queries, mask)
        return x


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

"""BLIP-2's Q-Former (Li et al. 2023): one BERT-style stack shared by learned queries and text.

Serving runs the query branch only: queries self-attend, cross-attend to the ViT's patches every
`cross_attention_frequency` layers, then go through the *query* feed-forward. Training (stage 1,
`fovea.training.stage1`) runs this same module with its text branch and adds heads around it:

- text alone (ITC): self-attention over the text (padding masked), the *text* feed-forward, no cross-attention;
- queries and text together (ITM): one self-attention over [queries, text], both directions; queries still
  cross-attend and use their own feed-forward, text uses its own;
- text decoding (ITG): text attends causally to itself and to all queries, queries never see the text. As in
  BLIP-2, the queries' keys and values come from the query-only pass: `decode` takes the query rows that
  entered each layer (`layer_inputs` of `forward`), so queries are not run twice.

Parameter names equal transformers' `Blip2QFormerModel` (`layernorm`, `encoder.layer.N.attention.attention.
query`, ..., `intermediate_query`, `output_query`, and `intermediate`/`output` for the text branch), so
checkpoints load as they are. Dropout exists only when built with `has_dropout=True` (training); a serving
model is deterministic whatever its train/eval mode.

Shapes: B batch, Q queries, T text tokens, L = Q + T, P image patches (+1 class token), D hidden size,
Dv the vision encoder's width.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Blip2QFormerConfig

from fovea.layers.activations import get_activation
from fovea.layers.encoder_attention import as_sdpa_mask, encoder_attention
from fovea.layers.linear import Linear


def _dropout(p: float, has_dropout: bool) -> nn.Module:
    return nn.Dropout(p) if has_dropout else nn.Identity()


class QFormerMultiHeadAttention(nn.Module):
    """query/key/value projections; keys and values may come from another input (the image patches for
    cross-attention, [cached queries, text] for decoding)."""

    def __init__(self, config: Blip2QFormerConfig, is_cross_attention: bool, has_dropout: bool):
        super().__init__()
        dim = config.hidden_size
        if dim % config.num_attention_heads:
            raise ValueError(f"hidden_size {dim} is not a multiple of num_attention_heads {config.num_attention_heads}")
        kv_dim = config.encoder_hidden_size if is_cross_attention else dim
        self.num_heads = config.num_attention_heads
        self.head_dim = dim // self.num_heads
        self.dropout_p = config.attention_probs_dropout_prob if has_dropout else 0.0
        self.query = Linear(dim, dim)
        self.key = Linear(kv_dim, dim)
        self.value = Linear(kv_dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # x [B, rows, D] attends to context [B, keys, kv_dim] under mask (broadcastable to (B, nh, rows, keys))
        return encoder_attention(self.query(x), self.key(context), self.value(context), self.num_heads,
                                 self.head_dim**-0.5, mask, self.dropout_p if self.training else 0.0)


class QFormerResidualOutput(nn.Module):
    """BERT's post-norm residual: LayerNorm(dropout(dense(x)) + residual)."""

    def __init__(self, config: Blip2QFormerConfig, in_features: int, has_dropout: bool):
        super().__init__()
        self.dense = Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = _dropout(config.hidden_dropout_prob, has_dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class QFormerAttention(nn.Module):
    def __init__(self, config: Blip2QFormerConfig, is_cross_attention: bool, has_dropout: bool):
        super().__init__()
        self.attention = QFormerMultiHeadAttention(config, is_cross_attention, has_dropout)
        self.output = QFormerResidualOutput(config, config.hidden_size, has_dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.attention(x, x if context is None else context, mask), x)


class QFormerIntermediate(nn.Module):
    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.intermediate_size)
        self.act = get_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class QFormerLayer(nn.Module):
    def __init__(self, config: Blip2QFormerConfig, layer_idx: int, has_text_branch: bool, has_dropout: bool):
        super().__init__()
        self.attention = QFormerAttention(config, False, has_dropout)
        self.has_cross_attention = layer_idx % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = QFormerAttention(config, True, has_dropout)
        self.has_text_branch = has_text_branch
        if has_text_branch:  # the text feed-forward: loaded with the checkpoint, run only by training
            self.intermediate = QFormerIntermediate(config)
            self.output = QFormerResidualOutput(config, config.intermediate_size, has_dropout)
        self.intermediate_query = QFormerIntermediate(config)
        self.output_query = QFormerResidualOutput(config, config.intermediate_size, has_dropout)

    def forward(self, x: torch.Tensor, num_query: int, mask: torch.Tensor | None,
                image_embeds: torch.Tensor | None, is_self_attended: bool = False) -> torch.Tensor:
        # x [B, L, D]: the first num_query rows are queries, the rest text. is_self_attended: x is already this
        # layer's self-attention output (queries only; see Blip2QFormerModel.forward_queries)
        if is_self_attended and num_query != x.shape[1]:
            raise ValueError("only a queries-only pass can start past a layer's self-attention")
        if not is_self_attended:
            x = self.attention(x, mask=mask)
        if num_query == x.shape[1]:  # queries only (serving): no slicing, no concatenation
            return self._query_feed_forward(x, image_embeds)
        if not num_query:
            return self._text_feed_forward(x)
        queries = self._query_feed_forward(x[:, :num_query], image_embeds)  # first: dropout draws in that order
        return torch.cat([queries, self._text_feed_forward(x[:, num_query:])], dim=1)

    def decode(self, text: torch.Tensor, query_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # text [B, T, D] attends to [query_states [B, Q, D], text] under mask (B, 1, T, Q + T)
        x = self.attention(text, context=torch.cat([query_states, text], dim=1), mask=mask)
        return self._text_feed_forward(x)

    def _query_feed_forward(self, queries: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        if self.has_cross_attention:
            if image_embeds is None:
                raise ValueError("queries need image_embeds: this layer cross-attends to the image")
            queries = self.crossattention(queries, context=image_embeds)
        return self.output_query(self.intermediate_query(queries), queries)

    def _text_feed_forward(self, text: torch.Tensor) -> torch.Tensor:
        if not self.has_text_branch:
            raise ValueError("this Q-Former has no text branch (use_qformer_text_input=False)")
        return self.output(self.intermediate(text), text)


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


class QFormerEncoder(nn.Module):
    def __init__(self, config: Blip2QFormerConfig, has_text_branch: bool, has_dropout: bool):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(config, i, has_text_branch, has_dropout)
                                   for i in range(config.num_hidden_layers))


class Blip2QFormerModel(nn.Module):
    """The shared stack. Inputs are embeddings: learned queries, text embeddings (the training
    `QFormerTextEmbeddings`), or both concatenated as [queries, text]."""

    def __init__(self, config: Blip2QFormerConfig, has_text_branch: bool | None = None, has_dropout: bool = False):
        """has_text_branch: build the text feed-forward (default: config.use_qformer_text_input).
        has_dropout: apply the config's dropout probabilities in training mode (training); False: none."""
        super().__init__()
        self.config = config
        self.has_text_branch = config.use_qformer_text_input if has_text_branch is None else has_text_branch
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = _dropout(config.hidden_dropout_prob, has_dropout)
        self.encoder = QFormerEncoder(config, self.has_text_branch, has_dropout)
        self.gradient_checkpointing = False

    def _call(self, fn, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, embeds: torch.Tensor, image_embeds: torch.Tensor | None = None, num_query: int | None = None,
                attention_mask: torch.Tensor | None = None,
                layer_inputs: list[torch.Tensor] | None = None) -> torch.Tensor:
        """embeds [B, L, D] -> [B, L, D].

        image_embeds [B, P, Dv]: what the queries cross-attend to (needed when there are queries).
        num_query: how many leading rows are queries (default: all of them, as when serving).
        attention_mask: (B, L) real/padding or (B, L, L) "may attend" (see `as_sdpa_mask`); None: all.
        layer_inputs: if a list, the query rows entering each layer [B, Q, D] are appended to it, for `decode`.
        """
        num_query = embeds.shape[1] if num_query is None else num_query
        x = self.dropout(self.layernorm(embeds))
        mask = as_sdpa_mask(attention_mask)
        for layer in self.encoder.layer:
            if layer_inputs is not None:
                layer_inputs.append(x[:, :num_query])
            x = self._call(layer, x, num_query, mask, image_embeds)
        return x

    def first_self_attention(self, queries: torch.Tensor) -> torch.Tensor:
        """Queries [B, Q, D] after the embedding norm and the first layer's self-attention. In a queries-only pass
        (serving BLIP-2) that depends on the queries alone, i.e. on the learned `query_tokens` and not the image: a
        caller may compute it once and hand it to `forward_queries` for every image."""
        return self.encoder.layer[0].attention(self.dropout(self.layernorm(queries)))

    def forward_queries(self, first_attention: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """`forward(queries, image_embeds)` of a queries-only pass, from `first_self_attention(queries)`
        [1 or B, Q, D] on; image_embeds [B, P, Dv] -> [B, Q, D]."""
        x = first_attention.expand(image_embeds.shape[0], -1, -1)
        for i, layer in enumerate(self.encoder.layer):  # each layer called as a module (hooks see every one)
            x = self._call(layer, x, x.shape[1], None, image_embeds, i == 0)
        return x

    def decode(self, text_embeds: torch.Tensor, query_layer_inputs: list[torch.Tensor],
               attention_mask: torch.Tensor) -> torch.Tensor:
        """Text rows of the ITG pass: text_embeds [B, T, D] -> [B, T, D].

        query_layer_inputs: per layer, the query rows [B, Q, D] that entered it in the query-only pass.
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

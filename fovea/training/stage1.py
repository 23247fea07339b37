"""Stage 1 of BLIP-2: learn to read a frozen image encoder with queries, by ITC + ITM + ITG.

`Stage1Model` holds the frozen ViT (`vision_model`), the learned `query_tokens`, the Q-Former with its text
branch and text `embeddings`, the ITC projections, the ITM head, and (for training only) the ITG head and
the learnable temperature. Without those two it is exactly transformers' `Blip2ForImageTextRetrieval`, with
the same parameter names, so `trainable_state` saves it as one and `load_parts` reads one.

Shapes: b local batch, N global batch, Q queries, T text length, P ViT tokens, D Q-Former width, E
`image_text_hidden_size`, V the Q-Former vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2Config

from fovea.layers.linear import LinearBase
from fovea.models.blip2 import BlipVisionModel
from fovea.models.blip2_qformer import Blip2QFormerModel
from fovea.training.distributed import all_gather_with_grad, concat_all_gather, get_rank, is_distributed
from fovea.training.losses import (count_targets, itc_logits, itc_loss, itg_attention_mask, itg_labels, itg_loss,
                                   itm_loss, sample_itm_negatives)
from fovea.training.qformer import QFormerLMHead, QFormerTextEmbeddings

TEMPERATURE_RANGE = (0.001, 0.5)
"""BLIP-2 clamps its learnable temperature into this range before every step."""


@dataclass(slots=True)
class Stage1Batch:
    input_ids: torch.Tensor
    """(b, T) Q-Former tokens of the captions: [CLS] first, right-padded to a fixed length (every process
    the same, so ITM can gather them)."""
    attention_mask: torch.Tensor
    """(b, T) 1 for real tokens, 0 for padding."""
    image_ids: torch.Tensor
    """(b,) int64; pairs of one image are never each other's negatives."""
    pixel_values: torch.Tensor | None = None
    """(b, 3, H, W); or give `image_embeds`."""
    image_embeds: torch.Tensor | None = None
    """(b, P, Dv) the frozen ViT's output, e.g. computed once per image and cached."""


@dataclass(slots=True)
class Stage1Output:
    loss: torch.Tensor
    """itc + itm + itg, the quantity trained."""
    itc: torch.Tensor
    itm: torch.Tensor
    itg: torch.Tensor


def targets_per_process(labels: torch.Tensor) -> torch.Tensor | None:
    """Next-token targets in the global batch / number of processes: the divisor that makes per-process token
    losses average to the global token mean (see `itg_loss`); None in one process (the plain mean)."""
    if not is_distributed():
        return None
    counts = concat_all_gather(count_targets(labels).view(1))
    return counts.sum().float() / counts.numel()


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: normal(0, std) matrices and embeddings, zero biases, unit LayerNorms."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, LinearBase, nn.Embedding)):
            nn.init.normal_(sub.weight, mean=0.0, std=std)
        if isinstance(sub, (nn.Linear, LinearBase)) and sub.bias is not None:
            nn.init.zeros_(sub.bias)
        if isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


def freeze(module: nn.Module) -> nn.Module:
    """No gradients, eval mode. Models holding frozen parts put them back in eval in their `train()`."""
    for param in module.parameters():
        param.requires_grad_(False)
    return module.eval()


class Stage1Model(nn.Module):
    # checkpoints written before transformers 5 store the ViT's q_bias and v_bias instead of qkv.bias
    packed_modules_mapping = {"qkv.bias": ["q_bias", "v_bias"]}

    def __init__(self, config: Blip2Config, decoder_token_id: int | None = None, temperature: float = 0.07,
                 with_training_heads: bool = True):
        """config: a `Blip2Config`; its `qformer_config` must have the text branch (use_qformer_text_input).
        decoder_token_id: the [DEC] token that starts ITG decoding (needed to train).
        with_training_heads: False leaves out the ITG head and the temperature: a scoring-only model with
        exactly `Blip2ForImageTextRetrieval`'s parameters."""
        super().__init__()
        qformer_config = config.qformer_config
        if not qformer_config.use_qformer_text_input:
            raise ValueError("stage 1 needs the Q-Former's text branch: set qformer_config.use_qformer_text_input")
        self.config = config
        self.decoder_token_id = decoder_token_id
        self.pad_token_id = qformer_config.pad_token_id
        self.num_query_tokens = config.num_query_tokens
        self.vision_model = freeze(BlipVisionModel(config.vision_config))
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qformer_config.hidden_size))
        self.embeddings = QFormerTextEmbeddings(qformer_config)
        self.qformer = Blip2QFormerModel(qformer_config, has_text_branch=True, has_dropout=True)
        self.vision_projection = nn.Linear(qformer_config.hidden_size, config.image_text_hidden_size)
        self.text_projection = nn.Linear(qformer_config.hidden_size, config.image_text_hidden_size)
        self.itm_head = nn.Linear(qformer_config.hidden_size, 2)
        self.with_training_heads = with_training_heads
        if with_training_heads:
            self.lm_head = QFormerLMHead(qformer_config, self.embeddings.word_embeddings)
            self.temp = nn.Parameter(torch.tensor(float(temperature)))
        self.reset_trainable_parameters(qformer_config.initializer_range)

    def train(self, mode: bool = True) -> "Stage1Model":
        super().train(mode)
        self.vision_model.eval()  # frozen: never in training mode
        return self

    def reset_trainable_parameters(self, std: float = 0.02) -> None:
        init_bert_weights(self.embeddings, std)
        init_bert_weights(self.qformer, std)
        for head in (self.vision_projection, self.text_projection, self.itm_head):
            init_bert_weights(head, std)
        if self.with_training_heads:
            init_bert_weights(self.lm_head, std)  # re-draws the tied table: same distribution
            nn.init.zeros_(self.lm_head.decoder.bias)
        with torch.no_grad():
            self.query_tokens.normal_(0.0, std)

    # ------------------------------------------------------------------ the three views of the Q-Former

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, P, Dv), the frozen ViT's last hidden state."""
        return self.vision_model(pixel_values.to(self.vision_model.post_layernorm.weight.dtype))

    def query_outputs(self, image_embeds: torch.Tensor,
                      layer_inputs: list[torch.Tensor] | None = None) -> torch.Tensor:
        """(B, P, Dv) -> (B, Q, D): the queries after reading the image."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.qformer(queries, image_embeds, layer_inputs=layer_inputs)

    def image_features(self, query_output: torch.Tensor) -> torch.Tensor:
        """(B, Q, D) -> (B, Q, E), L2-normalised: one ITC embedding per query."""
        return F.normalize(self.vision_projection(query_output), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T) -> (B, E), L2-normalised: the ITC embedding of the text's first ([CLS]) position."""
        text_output = self.qformer(self.embeddings(input_ids), num_query=0, attention_mask=attention_mask)
        return F.normalize(self.text_projection(text_output[:, 0]), dim=-1)

    def itm_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Pairs (image i, text i) -> (B, 2) [no match, match] logits: queries and text attend to each other,
        the ITM head reads every query output and the logits are their mean."""
        batch = input_ids.shape[0]
        queries = self.query_tokens.expand(batch, -1, -1)
        embeds = torch.cat([queries, self.embeddings(input_ids).to(queries.dtype)], dim=1)  # (B, Q + T, D)
        if attention_mask is not None:
            query_mask = attention_mask.new_ones(batch, self.num_query_tokens)
            attention_mask = torch.cat([query_mask, attention_mask], dim=1)
        output = self.qformer(embeds, image_embeds, self.num_query_tokens, attention_mask=attention_mask)
        return self.itm_head(output[:, : self.num_query_tokens]).mean(dim=1)

    def itg_logits(self, decoder_input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   query_layer_inputs: list[torch.Tensor]) -> torch.Tensor:
        """(B, T) [DEC]-first ids -> (B, T, V) next-token logits; text sees all queries and earlier text."""
        mask = itg_attention_mask(self.num_query_tokens, attention_mask)[:, self.num_query_tokens:]  # (B, T, Q+T)
        hidden = self.qformer.decode(self.embeddings(decoder_input_ids), query_layer_inputs, mask)
        return self.lm_head(hidden)

    # ------------------------------------------------------------------ training

    def forward(self, batch: Stage1Batch, itm_generator: torch.Generator | None = None) -> Stage1Output:
        """The three losses on this process's batch; features, ids and texts are gathered from every process
        (ITC's with gradients), so N processes train exactly as one process on the global batch.

        itm_generator: draws the ITM hard negatives; the same seed on every process gives the draws one
        process would make (see `sample_itm_negatives`).
        """
        if not self.with_training_heads or self.decoder_token_id is None:
            raise ValueError("training needs the ITG head, the temperature and decoder_token_id")
        image_embeds = batch.image_embeds if batch.image_embeds is not None else self.encode_images(batch.pixel_values)
        input_ids, attention_mask, image_ids = batch.input_ids, batch.attention_mask, batch.image_ids
        rank = get_rank()
        with torch.no_grad():
            self.temp.clamp_(*TEMPERATURE_RANGE)

        layer_inputs: list[torch.Tensor] = []
        query_output = self.query_outputs(image_embeds, layer_inputs)  # (b, Q, D)
        image_feats = self.image_features(query_output)  # (b, Q, E)
        text_feat = self.text_features(input_ids, attention_mask)  # (b, E)

        # ITC against every process's features, gradients flowing back to their owners
        all_image_feats = all_gather_with_grad(image_feats)  # (N, Q, E)
        all_text_feat = all_gather_with_grad(text_feat)  # (N, E)
        all_image_ids = concat_all_gather(image_ids)  # (N,)
        itc = itc_loss(image_feats, text_feat, self.temp, label_smoothing=0.1, image_ids=image_ids,
                       all_image_feats=all_image_feats, all_text_feats=all_text_feat, rank=rank,
                       all_image_ids=all_image_ids)

        # ITM on [positives, (text, hard negative image), (image, hard negative text)]
        sims = itc_logits(image_feats.detach(), text_feat.detach(), self.temp.detach(), all_image_feats.detach(),
                          all_text_feat.detach())
        negatives = sample_itm_negatives(sims.i2t, sims.t2i, image_ids, generator=itm_generator,
                                         all_image_ids=all_image_ids, rank=rank)
        all_image_embeds = concat_all_gather(image_embeds)  # frozen encoder: nothing to send back
        all_input_ids, all_mask = concat_all_gather(input_ids), concat_all_gather(attention_mask)
        itm_images = torch.cat([image_embeds, all_image_embeds[negatives.image_index], image_embeds])
        itm_ids = torch.cat([input_ids, input_ids, all_input_ids[negatives.text_index]])
        itm_mask = torch.cat([attention_mask, attention_mask, all_mask[negatives.text_index]])
        itm = itm_loss(self.itm_logits(itm_images, itm_ids, itm_mask))

        # ITG: [DEC] + caption, decoded from the queries of the ITC pass
        decoder_input_ids, labels = itg_labels(input_ids, self.pad_token_id, self.decoder_token_id)
        itg = itg_loss(self.itg_logits(decoder_input_ids, attention_mask, layer_inputs), labels, label_smoothing=0.1,
                       num_targets=targets_per_process(labels))
        return Stage1Output(loss=itc + itm + itg, itc=itc.detach(), itm=itm.detach(), itg=itg.detach())

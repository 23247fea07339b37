"""Stage 2 of BLIP-2: teach a frozen language model to read the Q-Former's queries.

`Stage2Model` is transformers' `Blip2ForConditionalGeneration` in training form: frozen ViT, learned queries,
the Q-Former's query branch, `language_projection`, and a frozen OPT (fovea's engine module, run padded by
`fovea.training.lm`). The LLM input is [projected queries (Q), BOS, prompt, text, EOS]; the LM loss is on the
text and EOS only (queries, BOS, prompt and padding are IGNORE_INDEX), as in BLIP-2's OPT recipe. That is also
exactly what the exported checkpoint sees at inference: transformers' processor and fovea's both put the
query placeholders before BOS and the prompt after it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Blip2Config

from fovea.models.blip2 import BlipVisionModel
from fovea.models.blip2_qformer import Blip2QFormerModel
from fovea.models.opt import OPTForCausalLM
from fovea.training.lm import opt_logits
from fovea.training.losses import lm_loss, stage2_labels
from fovea.training.stage1 import freeze, targets_per_process


@dataclass(slots=True)
class Stage2Batch:
    input_ids: torch.Tensor
    """(b, T) LLM tokens [BOS, prompt, text, EOS], right-padded."""
    attention_mask: torch.Tensor
    """(b, T) 1 real, 0 padding."""
    prompt_lengths: torch.Tensor
    """(b,) tokens at the start that are not targets: BOS and the prompt."""
    pixel_values: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    """(b, P, Dv) precomputed frozen ViT output, instead of pixel_values."""


@dataclass(slots=True)
class Stage2Output:
    loss: torch.Tensor


def tokenize_stage2(tokenizer, texts: Sequence[str], prompts: Sequence[str] | str = "",
                    max_length: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, prompt_lengths) for `Stage2Batch`, right-padded to the longest.

    The prompt is tokenized exactly as at inference (BOS + prompt, as the processor does); the text follows
    as its own tokens (a space before it when there is a prompt, so "Answer:" + " red" tokenizes like the
    generated continuation), then EOS, so the model learns to stop. Texts are cut to fit max_length.
    """
    if isinstance(prompts, str):
        prompts = [prompts] * len(texts)
    rows, prompt_lengths = [], []
    for text, prompt in zip(texts, prompts, strict=True):
        head = tokenizer(prompt).input_ids
        body = tokenizer((" " + text) if prompt else text, add_special_tokens=False).input_ids
        room = max_length - len(head) - 1
        if room < 1:
            raise ValueError(f"prompt {prompt!r} leaves no room for text within max_length={max_length}")
        rows.append(head + body[:room] + [tokenizer.eos_token_id])
        prompt_lengths.append(len(head))
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row)
        attention_mask[i, :len(row)] = 1
    return input_ids, attention_mask, torch.tensor(prompt_lengths)


class Stage2Model(nn.Module):
    def __init__(self, config: Blip2Config, language_model: OPTForCausalLM | None = None):
        """config: a `Blip2Config` with an OPT text_config; the Q-Former runs its query branch only.
        language_model: the frozen LLM (built from config.text_config when None, for loading weights later)."""
        super().__init__()
        text_config = config.text_config
        if text_config.model_type != "opt":
            raise ValueError(f"stage 2 trains through OPT language models, not {text_config.model_type!r}")
        if text_config.word_embed_proj_dim != text_config.hidden_size:
            raise ValueError("stage 2 needs word_embed_proj_dim == hidden_size (every released BLIP-2 OPT)")
        self.config = config
        self.num_query_tokens = config.num_query_tokens
        self.gradient_checkpointing = False
        self.vision_model = freeze(BlipVisionModel(config.vision_config))
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = Blip2QFormerModel(config.qformer_config, has_text_branch=False, has_dropout=True)
        self.language_projection = nn.Linear(config.qformer_config.hidden_size, text_config.hidden_size)
        self.language_model = freeze(language_model if language_model is not None else OPTForCausalLM(text_config))

    def train(self, mode: bool = True) -> "Stage2Model":
        super().train(mode)
        self.vision_model.eval()
        self.language_model.eval()
        return self

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values.to(self.vision_model.post_layernorm.weight.dtype))

    def image_inputs(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, P, Dv) -> (B, Q, hidden): the rows that stand for the image in the LLM input."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        self.qformer.gradient_checkpointing = self.gradient_checkpointing
        return self.language_projection(self.qformer(queries, image_embeds))

    def forward(self, batch: Stage2Batch) -> Stage2Output:
        image_embeds = batch.image_embeds if batch.image_embeds is not None else self.encode_images(batch.pixel_values)
        image_rows = self.image_inputs(image_embeds)  # (b, Q, H)
        text_rows = self.language_model.get_input_embeddings()(batch.input_ids)  # (b, T, H)
        embeds = torch.cat([image_rows, text_rows.to(image_rows.dtype)], dim=1)
        mask = torch.cat([batch.attention_mask.new_ones(image_rows.shape[:2]), batch.attention_mask], dim=1)
        logits = opt_logits(self.language_model, embeds, mask, self.gradient_checkpointing)  # (b, Q + T, V)
        labels = stage2_labels(batch.input_ids, batch.attention_mask, self.num_query_tokens, batch.prompt_lengths)
        return Stage2Output(loss=lm_loss(logits, labels, num_targets=targets_per_process(labels)))

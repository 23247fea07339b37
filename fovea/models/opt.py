"""OPT (Zhang et al. 2022), the language model of the released BLIP-2 checkpoints.

Parameter names follow transformers' `OPTForCausalLM` (`model.decoder.layers.N...`), except that each
layer's q/k/v projections are packed into `qkv_proj` (one matmul instead of three).

Particular to OPT: learned absolute positions stored with an offset of 2; optional `project_in`/`project_out`
when `word_embed_proj_dim` differs from `hidden_size`; pre-norm layers, or post-norm ones
(`do_layer_norm_before=False`, as OPT-350m) which also have no final layer norm.

Tensor parallel: q/k/v and fc1 split by heads and columns, out_proj and fc2 by rows, the token table and
`lm_head` by vocabulary; the position table, layer norms and `project_in`/`project_out` are replicated.

Pipeline stages (fovea.distributed.pipeline): the first builds the token and position tables and
`project_in`, the last the final norm, `project_out` and `lm_head`; the hidden state [N, hidden] is what passes.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import OPTConfig

from fovea.distributed import parallel_state as ps
from fovea.distributed.pipeline import (
    IntermediateTensors,
    first_stage_only,
    last_stage_only,
    make_layers,
    tied_lm_head_name,
)
from fovea.layers.activations import get_activation
from fovea.layers.attention import Attention, AttentionMetadata, checkpoint_in_context, get_attention_metadata
from fovea.layers.linear import Linear
from fovea.layers.parallel_linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from fovea.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding
from fovea.models.interfaces import (SupportsLoRA, SupportsOutputRows, SupportsPP, SupportsQuant,
                                    SupportsTensorParallel)
from fovea.models.utils import TokenEmbeddingsMixin

OPT_LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # PEFT's names for OPT's projections
POSITION_OFFSET = 2  # OPT's position table keeps two rows before position 0 (a fairseq leftover)


class OPTAttention(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        hidden = config.hidden_size
        num_heads = config.num_attention_heads
        if hidden % num_heads:
            raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads {num_heads}")
        head_dim = hidden // num_heads
        self.qkv_proj = QKVParallelLinear(hidden, head_dim, num_heads, num_heads, bias=config.enable_bias)
        self.out_proj = RowParallelLinear(hidden, hidden, bias=config.enable_bias)
        self.attn = Attention(self.qkv_proj.num_heads, head_dim, scale=head_dim**-0.5)  # this rank's heads

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [N, hidden]
        # q, k, v [N, hidden / tp]: this rank's heads
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden_states))
        return self.out_proj(self.attn(q, k, v))

    def forward_rows(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # q/k/v of all N rows (K/V cached); attention and out_proj for the step's S output rows -> [S, hidden]
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden_states))
        return self.out_proj(self.attn.forward_rows(q, k, v))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        hidden = config.hidden_size
        affine = config.layer_norm_elementwise_affine
        self.do_layer_norm_before = config.do_layer_norm_before
        self.self_attn = OPTAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        self.fc1 = ColumnParallelLinear(hidden, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = RowParallelLinear(config.ffn_dim, hidden, bias=config.enable_bias)
        self.final_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        self.act = get_activation(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, hidden]
        if self.do_layer_norm_before:
            x = x + self.self_attn(self.self_attn_layer_norm(x))
            return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x + self.self_attn(x))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))

    def forward_rows(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [S, hidden]
        """`forward` for a last layer read at `rows` [S] only (the step's logits rows): every row goes through
        the q/k/v projection (the cache needs its K/V), attention, out_proj, the norms and the MLP run on S rows.
        Each works row by row, so those rows get what `forward` gives them (their attention as a decode's: the
        paged kernel instead of causal SDPA, another summation order)."""
        if self.do_layer_norm_before:
            x = x[rows] + self.self_attn.forward_rows(self.self_attn_layer_norm(x))
            return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x[rows] + self.self_attn.forward_rows(x))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class OPTDecoder(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        hidden, embed_dim = config.hidden_size, config.word_embed_proj_dim
        self.embed_tokens = first_stage_only(lambda: VocabParallelEmbedding(config.vocab_size, embed_dim))
        self.embed_positions = first_stage_only(
            lambda: nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, hidden))
        # token embeddings (and lm_head) live in word_embed_proj_dim; the layers in hidden_size
        has_projections = embed_dim != hidden
        self.project_in = first_stage_only(lambda: Linear(embed_dim, hidden, bias=False)) if has_projections else None
        self.project_out = last_stage_only(lambda: Linear(hidden, embed_dim, bias=False)) if has_projections else None
        has_final_norm = config.do_layer_norm_before and not config._remove_final_layer_norm
        self.final_layer_norm = last_stage_only(
            lambda: nn.LayerNorm(hidden, elementwise_affine=config.layer_norm_elementwise_affine)
        ) if has_final_norm else None
        self.start_layer, self.end_layer, self.layers = make_layers(config.num_hidden_layers,
                                                                    lambda _: OPTDecoderLayer(config))
        self.gradient_checkpointing = False  # training: recompute each layer in backward instead of keeping it

    def forward(self, inputs_embeds: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        # inputs_embeds [N, word_embed_proj_dim], positions [N] 0-based within each request (serving); or
        # [B, L, word_embed_proj_dim] and [B, L] for a padded batch without KV cache (training)
        if ps.is_first_stage():
            x = inputs_embeds if self.project_in is None else self.project_in(inputs_embeds)
            x = x + self.embed_positions(positions + POSITION_OFFSET)
        else:
            x = intermediate_tensors["hidden_states"]  # [N, hidden]
        is_checkpointed = self.gradient_checkpointing and torch.is_grad_enabled()
        layers = self.layers[self.start_layer:self.end_layer]
        # a step that reads only some rows (its logits rows; `AttentionMetadata.output_group`): the last layer
        # skips the others past its q/k/v projection, and [S, ...] comes out
        meta = get_attention_metadata()
        output_group = meta.output_group if isinstance(meta, AttentionMetadata) and ps.is_last_stage() \
            and len(layers) else None
        for layer in layers[:-1] if output_group is not None else layers:
            x = checkpoint_in_context(layer, x) if is_checkpointed else layer(x)
        if output_group is not None:
            x = layers[-1].forward_rows(x, output_group.token_index)
        if not ps.is_last_stage():
            return {"hidden_states": x}
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x  # [N, word_embed_proj_dim]


class OPTModel(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        self.decoder = OPTDecoder(config)


class OPTForCausalLM(TokenEmbeddingsMixin, nn.Module, SupportsQuant, SupportsLoRA, SupportsTensorParallel, SupportsPP,
                     SupportsOutputRows):
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    language_model_modules = ("model",)
    lm_head_module = "lm_head"
    lora_layers_prefix = "model.decoder.layers."
    lora_target_modules = OPT_LORA_TARGET_MODULES

    def __init__(self, config: OPTConfig):
        super().__init__()
        self.config = config
        self.model = OPTModel(config)
        self.lm_head = last_stage_only(lambda: ParallelLMHead(config.word_embed_proj_dim, config.vocab_size, bias=False))
        self.tie_word_embeddings = bool(config.tie_word_embeddings)
        if self.tie_word_embeddings and ps.pp_size() == 1:
            self.lm_head.tie_to(self.model.decoder.embed_tokens)

    def get_text_config(self) -> OPTConfig:
        return self.config

    def rename_checkpoint_weight(self, name: str) -> str | None:
        if name.startswith("decoder."):  # facebook/opt-* files name the base model's weights without "model."
            name = "model." + name
        return tied_lm_head_name(name, self.tie_word_embeddings, "model.decoder.embed_tokens.weight")

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.decoder.embed_tokens

    def forward(
        self, input_ids: torch.Tensor | None, positions: torch.Tensor, inputs_embeds: torch.Tensor | None = None,
        intermediate_tensors: IntermediateTensors | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if ps.is_first_stage():
            inputs_embeds = self.resolve_inputs_embeds(input_ids, inputs_embeds)
        return self.model.decoder(inputs_embeds, positions, intermediate_tensors)

    def intermediate_shapes(self, num_tokens: int) -> dict[str, tuple[int, ...]]:
        return {"hidden_states": (num_tokens, self.config.hidden_size)}

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [n, word_embed_proj_dim]
        return self.lm_head(hidden_states)  # [n, vocab]

"""Llama (Touvron et al. 2023): a pre-norm decoder with grouped-query attention, rotary positions, SwiGLU and
RMSNorm; the blocks Qwen2 and Mistral share (qwen2.py and `MistralForCausalLM` below are differences over it).

Parameter names follow transformers' `LlamaForCausalLM` (`model.layers.N...`), except that each layer's q/k/v
projections are packed into `qkv_proj` and the MLP's gate/up projections into `gate_up_proj` (one matmul each
instead of three and two).

What the config varies: `num_key_value_heads` (GQA), `head_dim`, `attention_bias` (q/k/v/o) and `mlp_bias`,
tied or untied `lm_head`, and RoPE: plain, "linear", "dynamic" (NTK) or "llama3" (`build_rotary_embedding`).

Tensor parallel (`fovea.layers.parallel_linear`, `fovea.layers.vocab_parallel`): q/k/v and gate/up split by
heads and columns, o and down by rows, the token table and `lm_head` by vocabulary; norms and rotary replicated.
Every size below that a rank holds is its own (`self.num_heads` etc. are per rank).
Pipeline stages (fovea.distributed.pipeline): the first builds `embed_tokens`, the last `norm` and `lm_head`;
inside a stage a layer hands the next its MLP output and the residual stream apart, so that the add runs fused
into the next norm (vLLM's layout), and a stage sums them before it sends: the hidden state [N, hidden] is all
that crosses between stages.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from fovea.distributed import parallel_state as ps
from fovea.distributed.pipeline import (
    IntermediateTensors,
    first_stage_only,
    last_stage_only,
    make_layers,
    tied_lm_head_name,
)
from fovea.layers.attention import AttentionMetadata, get_attention_metadata
from fovea.layers.mlp import GatedMLP
from fovea.layers.norms import RMSNorm
from fovea.layers.parallel_linear import QKVParallelLinear, RowParallelLinear
from fovea.layers.rotary import RotaryEmbedding, build_rotary_embedding
from fovea.layers.rotary_attention import RotaryQKVAttention
from fovea.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding
from fovea.models.interfaces import (SupportsLoRA, SupportsOutputRows, SupportsPP, SupportsQuant,
                                     SupportsTensorParallel)
from fovea.models.llama_decode import DecodePlan, is_decode_only
from fovea.models.utils import TokenEmbeddingsMixin

logger = logging.getLogger(__name__)


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# PEFT's names for the projections of Llama-style decoders (Qwen2, Mistral: the same)
LLAMA_LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

class LlamaAttention(nn.Module):
    """q/k/v packed, rotary on q and k, paged causal attention with `num_key_value_heads` KV heads (this rank's
    heads under tensor parallelism: its KV cache holds its KV heads only)."""

    def __init__(self, config, qkv_bias: bool, o_bias: bool):
        super().__init__()
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads {num_heads} is not a multiple of "
                             f"num_key_value_heads {num_kv_heads}")
        self.head_dim = head_dim_of(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, num_heads, num_kv_heads, bias=qkv_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, config.hidden_size, bias=o_bias)
        self.attn = RotaryQKVAttention(self.num_heads, self.head_dim, scale=self.head_dim**-0.5,
                                       num_kv_heads=self.num_kv_heads)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x [N, hidden]; cos, sin [N, head_dim]; qkv (N, (nh + 2 nkv) * hs), rotated and split by the attention
        return self.o_proj(self.attn(self.qkv_proj(x), cos, sin))

    def forward_rows(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # q/k/v of all N rows (K/V cached); attention and o_proj for the step's S output rows -> [S, hidden]
        return self.o_proj(self.attn.forward_rows(self.qkv_proj(x), cos, sin))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, qkv_bias: bool, o_bias: bool, mlp_bias: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, qkv_bias, o_bias)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, bias=mlp_bias,
                            tensor_parallel=True)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, hidden]: the previous layer's MLP output, not yet added into `residual` (the stream of residual
        sums); the first layer gets the hidden state itself and None. Returns (this layer's MLP output, the
        stream before it): each add is done by the next norm's fused kernel (`RMSNorm.forward(x, residual)`),
        rounded where transformers' `residual + hidden_states` rounds."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x, residual = self.post_attention_layernorm(self.self_attn(x, cos, sin), residual)
        return self.mlp(x), residual

    def forward_rows(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                     rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` for a last layer whose outputs are read at `rows` [S] only (the step's logits rows): every
        row still goes through the packed q/k/v projection (the cache needs its K/V), but the attention, o_proj,
        the MLP and the norm between them run on S rows. Each works row by row, so those rows get what `forward`
        gives them (their attention as a decode's: the paged kernel instead of causal SDPA, another summation
        order)."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x, residual = self.post_attention_layernorm(self.self_attn.forward_rows(x, cos, sin), residual[rows])
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    """The decoder stack. The caller builds the rotary module (1-D here, M-RoPE for Qwen2.5-VL) and says
    which projections carry biases (Llama: `attention_bias` on all four; Qwen2: q/k/v only)."""

    def __init__(self, config, rotary: RotaryEmbedding, *, qkv_bias: bool, o_bias: bool, mlp_bias: bool):
        super().__init__()
        self.embed_tokens = first_stage_only(lambda: VocabParallelEmbedding(config.vocab_size, config.hidden_size))
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers, lambda _: LlamaDecoderLayer(config, qkv_bias, o_bias, mlp_bias))
        self.norm = last_stage_only(lambda: RMSNorm(config.hidden_size, eps=config.rms_norm_eps))
        self.rotary = rotary
        self.fused_decode = True  # False: decode steps call every module too (forward hooks see them)
        self._decode_plan: DecodePlan | bool | None = None  # None until the first decode step; False: none fits

    def forward(self, inputs_embeds: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        # inputs_embeds [N, hidden] (first stage) or the previous stage's hidden state; positions [N] (or [3, N]
        # for M-RoPE), each request's own
        x = inputs_embeds if ps.is_first_stage() else intermediate_tensors["hidden_states"]
        cos, sin = self.rotary(positions, x.dtype)
        meta = get_attention_metadata()
        plan = self._decode_plan
        if self.fused_decode and plan is not False and is_decode_only(meta):
            if plan is None:  # decided once, at the first decode step (the KV cache is bound by then)
                layers = self.layers[self.start_layer:self.end_layer]
                plan = self._decode_plan = x.dtype == torch.bfloat16 \
                    and all(type(layer) is LlamaDecoderLayer for layer in layers) and DecodePlan.build(layers) or False
            if plan and plan.takes(x):  # fovea.models.llama_decode: the layers' kernels, no modules between them
                x, residual = plan.run(x, cos, sin, meta)
                return self._finish(x, residual)
        residual = None
        layers = self.layers[self.start_layer:self.end_layer]
        # a step that reads only some rows (its logits rows; `AttentionMetadata.output_group`): the last layer
        # skips the others past its q/k/v projection, and [S, hidden] comes out
        output_group = meta.output_group if isinstance(meta, AttentionMetadata) and ps.is_last_stage() \
            and len(layers) else None
        for layer in layers[:-1] if output_group is not None else layers:
            x, residual = layer(x, residual, cos, sin)
        if output_group is not None:
            x, residual = layers[-1].forward_rows(x, residual, cos, sin, output_group.token_index)
        return self._finish(x, residual)

    def _finish(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor | IntermediateTensors:
        if not ps.is_last_stage():
            return {"hidden_states": x if residual is None else x + residual}
        return self.norm(x) if residual is None else self.norm(x, residual)[0]

    def extra_repr(self) -> str:
        plan = self._decode_plan
        return "decode=" + ("modules (fused_decode off)" if not self.fused_decode else
                            "not decided (no decode step yet)" if plan is None else
                            "one loop of kernel calls (fovea.models.llama_decode)" if plan else "modules")


class LlamaForCausalLM(TokenEmbeddingsMixin, nn.Module, SupportsQuant, SupportsLoRA, SupportsTensorParallel, SupportsPP,
                       SupportsOutputRows):
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    language_model_modules = ("model",)
    lm_head_module = "lm_head"
    lora_layers_prefix = "model.layers."
    lora_target_modules = LLAMA_LORA_TARGET_MODULES

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = self.build_model(config)
        self.lm_head = last_stage_only(lambda: ParallelLMHead(config.hidden_size, config.vocab_size, bias=False))
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings and ps.pp_size() == 1:
            self.lm_head.tie_to(self.model.embed_tokens)

    @staticmethod
    def build_model(config) -> LlamaModel:
        bias = bool(getattr(config, "attention_bias", False))
        return LlamaModel(config, build_rotary_embedding(config, head_dim_of(config)), qkv_bias=bias, o_bias=bias,
                          mlp_bias=bool(getattr(config, "mlp_bias", False)))

    def get_text_config(self):
        return self.config

    def rename_checkpoint_weight(self, name: str) -> str | None:
        if name.endswith("rotary_emb.inv_freq"):
            return None  # older checkpoints store the (recomputed) frequencies
        return tied_lm_head_name(name, self.tie_word_embeddings, "model.embed_tokens.weight")

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(
        self, input_ids: torch.Tensor | None, positions: torch.Tensor, inputs_embeds: torch.Tensor | None = None,
        intermediate_tensors: IntermediateTensors | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if ps.is_first_stage():
            inputs_embeds = self.resolve_inputs_embeds(input_ids, inputs_embeds)
        return self.model(inputs_embeds, positions, intermediate_tensors)

    def intermediate_shapes(self, num_tokens: int) -> dict[str, tuple[int, ...]]:
        return {"hidden_states": (num_tokens, self.config.hidden_size)}

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [n, hidden]
        return self.lm_head(hidden_states)  # [n, vocab]


def sliding_window_of(text_config) -> int | None:
    """The attention window a Mistral-style config applies on every layer (None: full attention). fovea's
    attention is full; it equals the windowed one while no sequence is longer than the window, so the engine
    keeps max_model_len within it (`LLMEngine`)."""
    if getattr(text_config, "model_type", None) != "mistral":
        return None
    return getattr(text_config, "sliding_window", None)


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: Llama's blocks (no biases) with a sliding attention window, exact while max_model_len <= window."""

    @classmethod
    def pp_unsupported_reason(cls, hf_config) -> str | None:
        return "Mistral has not been verified with pipeline parallelism"

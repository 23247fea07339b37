"""T5 / Flan-T5 (Raffel et al. 2020; Chung et al. 2022): an encoder-decoder, BLIP-2's other language model.

What is particular to T5:
- no absolute positions: each stack adds a learned, bucketed *relative position bias* to its self-attention
  scores, held by its first block and shared by every later one (bidirectional buckets in the encoder, causal
  ones in the decoder); cross-attention has none;
- attention scores are not scaled by head_dim ** -0.5 (the initialisation absorbed it);
- the layer norm is an RMS norm without bias or mean, and pre-norm everywhere, with a final norm per stack;
- the feed-forward is ReLU (T5 v1.0) or gated GELU (Flan-T5, T5 v1.1): wo(act(wi_0 x) * wi_1 x); as
  transformers does, `wo` stays float32 in a float16 model (and the residual stream is float32 from then on);
  a bfloat16 model runs it in bfloat16, as transformers' `from_pretrained(dtype=torch.bfloat16)` does;
- the output projection shares the token table unless the checkpoint has its own `lm_head.weight` (Flan-T5),
  and the decoder output is scaled by d_model ** -0.5 first when `scale_decoder_outputs` (transformers 5.23's
  name; older config.json files say `tie_word_embeddings`, true for T5 v1.0 and false for Flan-T5).

In the engine (fovea.worker.encoder_decoder) the encoder runs once per request over its whole prompt, each
decoder layer writes the encoder output's keys/values into the request's cross blocks, and `forward` is the
decoder over the step's flat batch (its self-attention paged with the position bias as an additive score: the
paged decode kernel adds it for one-token queries, SDPA takes it as the mask for longer runs).
Without an attention context (`forward_dense`), the same modules run over whole sequences, nothing cached.

Module and parameter names follow transformers' `T5ForConditionalGeneration`, so checkpoints load as they are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from fovea import kernels
from fovea.kernels import t5_fused
from fovea.layers.activations import get_activation
from fovea.layers.attention import Attention, AttentionMetadata, get_attention_metadata
from fovea.layers.cross_attention import CrossAttention
from fovea.layers.linear import Linear
from fovea.models.interfaces import SupportsEncoderDecoder
from fovea.models.utils import TokenEmbeddingsMixin


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Bucket of each key - query distance: exact below half the buckets, logarithmic up to `max_distance`,
    one bucket beyond. Bidirectional splits the buckets between keys before and after the query; causal
    counts only keys before it (later ones are masked anyway). Same arithmetic as Mesh TensorFlow's, so the
    same buckets to the last one."""
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # the float division and log in this order: a bucket boundary must fall exactly where transformers' does
    scaled = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    large = (max_exact + scaled.to(torch.long)).clamp(max=num_buckets - 1)
    return bucket + torch.where(is_small, distance, large)


@dataclass(slots=True)
class EncoderBatch:
    """The encoder's prompts packed row after row ([N, d], prompt b's rows consecutive), as every layer but
    self-attention sees them: linears, norms and the feed-forward run on real rows only (padding to the
    longest prompt costs as much as the prompts' length spread, ~25% of the encoder at the benchmark's).
    Self-attention pads q, k, v to [B, L] for one SDPA call and packs its output again.

    bias:      [B or 1, nh, L, L] in the activations' dtype: position scores, -inf on padding keys.
    pad_index: [N] long, each packed row's place in the padded [B * L] rows; None when every prompt has
               length L (padding is a view).
    """

    bias: torch.Tensor
    num_seqs: int
    max_len: int
    pad_index: torch.Tensor | None

    def pad(self, t: torch.Tensor) -> torch.Tensor:  # [N, w] -> [B, L, w], padding rows zero
        if self.pad_index is None:
            return t.view(self.num_seqs, self.max_len, -1)
        out = t.new_zeros(self.num_seqs * self.max_len, t.shape[-1])
        return out.index_copy_(0, self.pad_index, t).view(self.num_seqs, self.max_len, -1)

    def unpad(self, t: torch.Tensor) -> torch.Tensor:  # [B, L, w] -> [N, w]
        flat = t.reshape(self.num_seqs * self.max_len, -1)
        return flat if self.pad_index is None else flat.index_select(0, self.pad_index)


class T5LayerNorm(nn.Module):
    """x / rms(x) * weight: the variance in float32, the result in the weight's dtype (as transformers').

    `forward(x, residual)` adds the residual stream first, as the previous sublayer's `residual + x`, and returns
    (norm(x + residual), x + residual): in an all-bfloat16 model (`wo` in bfloat16, the stream bfloat16) one kernel
    does the add and the norm (`kernels.add_rms_norm_`, the sum written into x's buffer: x is a sublayer's fresh
    output), so a decode step runs one call between two sublayers where it ran a torch add and the norm.

    In bfloat16 over rows with contiguous features at inference, one fused kernel (`fovea.kernels.t5_fused`)
    with the same roundings instead of seven ops (the add-norm kernel's rows are the same function's, bit for bit).
    Not in float32: its float32 sum and rsqrt may differ from torch's in the last bit or two, and a float32 T5
    (unscaled attention scores) carries that into logprobs ~5x further from transformers' (1.3e-4 against 2.6e-5
    on the tiny test model); a bfloat16 rounding hides it."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        weight = self.weight  # one lookup (nn.Module.__getattr__ per access, paid in every decode step)
        is_bf16 = weight.dtype == torch.bfloat16 and x.dim() == 2 and x.stride(1) == 1
        if residual is None:
            if is_bf16 and kernels.can_fuse(x, weight):
                return t5_fused.t5_layer_norm(x, weight, self.eps)
            return self.reference(x)
        if (is_bf16 and x.dtype == weight.dtype and residual.dtype == weight.dtype and residual.stride(-1) == 1
                and kernels.can_fuse(x, residual, weight)):
            return kernels.add_rms_norm_(x, residual, weight, self.eps), x
        stream = residual + x  # float32 from the first float32 `wo` on (float16 models)
        return self(stream), stream

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)


class T5Attention(nn.Module):
    """q, k, v, o projections of one attention; the position-bias table when it is the stack's first block.

    kind: "encoder" (bidirectional, dense), "decoder" (causal, paged), "cross" (decoder over encoder, paged)."""

    def __init__(self, config: PretrainedConfig, kind: str, has_bias: bool, self_attention: Attention | None = None):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.num_heads, self.head_dim = config.num_heads, config.d_kv
        self.q = Linear(config.d_model, inner, bias=False)
        self.k = Linear(config.d_model, inner, bias=False)
        self.v = Linear(config.d_model, inner, bias=False)
        self.o = Linear(inner, config.d_model, bias=False)
        self.kind = kind
        if has_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)
            self.num_buckets = config.relative_attention_num_buckets
            self.max_distance = config.relative_attention_max_distance
        if kind == "decoder":
            self.attn = Attention(config.num_heads, config.d_kv, scale=1.0)  # T5 does not scale its scores
        elif kind == "cross":
            self.attn = CrossAttention(self_attention, scale=1.0)

    def position_bias(self, relative_position: torch.Tensor) -> torch.Tensor:
        """[..., Lq, Lk] key - query distances -> [..., num_heads, Lq, Lk] additive scores."""
        bucket = relative_position_bucket(relative_position, self.kind == "encoder", self.num_buckets,
                                          self.max_distance)
        return self.relative_attention_bias(bucket).movedim(-1, -3)

    def forward(self, x: torch.Tensor, bias=None, encoder_states: torch.Tensor | None = None) -> torch.Tensor:
        q = self.q(x)
        if self.kind == "cross":
            if encoder_states is None:  # paged: keys/values are in the cross blocks
                return self.o(self.attn(q))
            return self.o(self.attn(q, self.k(encoder_states), self.v(encoder_states)))
        k, v = self.k(x), self.v(x)
        if self.kind == "decoder":
            return self.o(self.attn(q, k, v, attn_bias=bias))
        batch: EncoderBatch = bias  # encoder: x [N, d] packed
        q, k, v = (batch.pad(t).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.bias.to(q.dtype), scale=1.0)  # (B, nh, L, hs)
        return self.o(batch.unpad(out.transpose(1, 2)))


class T5FeedForward(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.is_gated = config.is_gated_act
        if self.is_gated:
            self.wi_0 = Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = Linear(config.d_model, config.d_ff, bias=False)
        self.wo = Linear(config.d_ff, config.d_model, bias=False)
        self.act = get_activation(config.dense_act_fn)
        # Flan-T5's "gated-gelu" is transformers' "gelu_new" (tanh): one fused kernel for the gate at inference in
        # bfloat16 (float32 keeps torch's ops and their last bits, as T5LayerNorm)
        self.is_gelu_tanh = config.dense_act_fn in ("gelu_new", "gelu_pytorch_tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_gated:
            h = self.act(self.wi(x))
        else:
            gate, up = self.wi_0(x), self.wi_1(x)
            if (self.is_gelu_tanh and gate.dtype == torch.bfloat16 and gate.dim() == 2 and gate.stride(1) == 1
                    and up.stride(1) == 1 and kernels.can_fuse(gate, up)):
                h = t5_fused.gelu_tanh_mul(gate, up)
            else:
                h = self.act(gate) * up
        return self.wo(h.to(self.wo.params_dtype))  # float32 when kept so (bfloat16 models)


class T5SubLayer(nn.Module):
    """x + f(norm(x)): the residual unit whose f is `SelfAttention`, `EncDecAttention` or `DenseReluDense`.

    The add is left to the next norm (`T5LayerNorm.forward(x, residual)`): forward(x, residual) takes the previous
    sublayer's output x and the stream it has not been added to yet (None: x is the stream, a stack's first
    sublayer) and returns (f's output, the stream)."""

    def __init__(self, config: PretrainedConfig, name: str, inner: nn.Module):
        super().__init__()
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.inner_name = name
        setattr(self, name, inner)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, *args) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            normed, residual = self.layer_norm(x), x
        else:
            normed, residual = self.layer_norm(x, residual)
        return getattr(self, self.inner_name)(normed, *args), residual


class T5Block(nn.Module):
    def __init__(self, config: PretrainedConfig, is_decoder: bool, has_bias: bool):
        super().__init__()
        self_attn = T5Attention(config, "decoder" if is_decoder else "encoder", has_bias)
        layers = [T5SubLayer(config, "SelfAttention", self_attn)]
        if is_decoder:
            layers.append(T5SubLayer(config, "EncDecAttention", T5Attention(config, "cross", False, self_attn.attn)))
        layers.append(T5SubLayer(config, "DenseReluDense", T5FeedForward(config)))
        self.layer = nn.ModuleList(layers)
        self.is_decoder = is_decoder

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, bias,
                encoder_states: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = self.layer[0](x, residual, bias)
        if self.is_decoder:
            x, residual = self.layer[1](x, residual, None, encoder_states)
        return self.layer[-1](x, residual)


class T5Stack(nn.Module):
    def __init__(self, config: PretrainedConfig, is_decoder: bool):
        super().__init__()
        num_layers = config.num_decoder_layers if is_decoder else config.num_layers
        self.block = nn.ModuleList(T5Block(config, is_decoder, has_bias=i == 0) for i in range(num_layers))
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    @property
    def bias_table(self) -> T5Attention:
        return self.block[0].layer[0].SelfAttention

    def forward(self, x: torch.Tensor, bias, encoder_states: torch.Tensor | None = None) -> torch.Tensor:
        residual = None
        for block in self.block:
            x, residual = block(x, residual, bias, encoder_states)
        return self.final_layer_norm(x, residual)[0]


class T5ForConditionalGeneration(TokenEmbeddingsMixin, nn.Module, SupportsEncoderDecoder):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        if config.model_type != "t5":
            raise ValueError(f"T5ForConditionalGeneration needs a T5 config, got model_type {config.model_type!r}")
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, is_decoder=False)
        self.decoder = T5Stack(config, is_decoder=True)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        # transformers 5.23 sets scale_decoder_outputs from an older file's tie_word_embeddings (default true)
        self.scale_decoder_outputs = bool(getattr(config, "scale_decoder_outputs", config.tie_word_embeddings))
        self.decoder_start_token_id = config.decoder_start_token_id
        # as transformers' _keep_in_fp32_modules = ["wo"]: float32 in a float16 model (whose range Flan-T5's wo
        # outputs overflow), not in a bfloat16 one (fovea.models.weights.build_model)
        self.keep_in_fp32_modules_float16 = tuple(
            f"{stack}.block.{i}.layer.{len(block.layer) - 1}.DenseReluDense.wo"
            for stack in ("encoder", "decoder") for i, block in enumerate(getattr(self, stack).block))
        self.is_lm_head_tied = False

    def get_text_config(self) -> PretrainedConfig:
        return self.config

    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    def adapt_to_checkpoint(self, tensor_names: set[str]) -> None:
        """A checkpoint without `lm_head.weight` (T5 v1.0, or anything transformers 5.23 saved tied) projects
        with the token table; one with it (Flan-T5) with its own."""
        if "lm_head.weight" not in tensor_names:
            self.lm_head.weight = self.shared.weight
            self.is_lm_head_tied = True

    def rename_checkpoint_weight(self, name: str) -> str | None:
        if name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            return None  # copies of `shared` that older checkpoints store
        if name == "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight":
            return None  # unused by T5 (transformers ignores it too)
        if name == "lm_head.weight" and self.is_lm_head_tied:
            return None
        return name

    # ---------------------------------------------------------------------------- encoder

    def encode(self, inputs_embeds: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """inputs_embeds [N, d]: prompts of `lengths` packed row after row -> the encoder's output [N, d]."""
        length = max(lengths)
        pos = torch.arange(length)
        bias = self.encoder.bias_table.position_bias(pos[None, :] - pos[:, None])[None]  # (1, nh, L, L)
        pad_index = None
        if any(n != length for n in lengths):
            is_pad = pos[None, :] >= torch.tensor(lengths)[:, None]  # (B, L)
            bias = bias.masked_fill(is_pad[:, None, None, :], float("-inf"))
            pad_index = (~is_pad).flatten().nonzero().flatten()
        # in the dtype of q (the norm's output, the model's dtype): SDPA adds a mask of q's dtype
        batch = EncoderBatch(bias.to(self.encoder.final_layer_norm.weight.dtype), len(lengths), length, pad_index)
        return self.encoder(inputs_embeds, batch)

    def store_cross_kv(self, encoder_states: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Each decoder layer's keys/values of encoder_states [M, d], written into the cross slots [M]."""
        for block in self.decoder.block:
            cross = block.layer[1].EncDecAttention
            x = encoder_states.to(cross.k.params_dtype)
            cross.attn.store(cross.k(x), cross.v(x), slot_mapping)

    # ---------------------------------------------------------------------------- decoder

    def _decoder_bias(self, meta: AttentionMetadata) -> list[torch.Tensor]:
        """Per attention group of the step: causal relative-position scores [B, nh, max_q, K] (keys past a
        query -inf), computed once and shared by every decoder layer. A decode group's are float32 and contiguous,
        as the paged decode kernel reads them (the table's values, exactly): converted once per step, not in each
        of the decoder's layers."""
        table = self.decoder.bias_table
        biases = []
        for g in meta.groups:
            key_pos = torch.arange(g.block_table.shape[1] * meta.block_size)
            rel = key_pos[None, None, :] - g.query_positions[:, :, None]  # (B, max_q, K)
            bias = table.position_bias(rel).masked_fill((rel > 0)[:, None], float("-inf"))
            biases.append(bias.to(torch.float32, memory_format=torch.contiguous_format) if g.is_decode else bias)
        return biases

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder over the step's flat batch [N] (positions are implicit in the attention metadata)."""
        meta = get_attention_metadata()
        if not isinstance(meta, AttentionMetadata):
            raise RuntimeError("T5's engine forward runs inside a step's forward_context; use forward_dense")
        x = self.resolve_inputs_embeds(input_ids, inputs_embeds)
        return self.decoder(x, self._decoder_bias(meta))

    def forward_dense(self, encoder_embeds: torch.Tensor, decoder_input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits without a KV cache: encoder_embeds [B, Le, d], decoder_input_ids [B, Ld]
        -> [B, Ld, vocab] (every sequence whole, no padding)."""
        batch, length = encoder_embeds.shape[:2]
        encoder_states = self.encode(encoder_embeds.flatten(0, 1), [length] * batch).view(batch, length, -1)
        pos = torch.arange(decoder_input_ids.shape[1])
        rel = pos[None, :] - pos[:, None]
        bias = self.decoder.bias_table.position_bias(rel).masked_fill(rel > 0, float("-inf"))[None]
        hidden = self.decoder(self.shared(decoder_input_ids), bias, encoder_states)
        return self.compute_logits(hidden)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [n, d_model] -> [n, vocab]
        if self.scale_decoder_outputs:
            hidden_states = hidden_states * self.config.d_model**-0.5
        return self.lm_head(hidden_states.to(self.lm_head.params_dtype))

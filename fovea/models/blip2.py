"""BLIP-2 (Li et al. 2023): a ViT, a Q-Former reading it through learned queries, and an OPT decoder.

An image becomes `num_query_tokens` rows in the language model's input: ViT patches -> Q-Former
(queries self-attend, cross-attend to the patches every `cross_attention_frequency` layers) ->
`language_projection`. The prompt holds that many placeholder tokens (transformers' processor puts them
before BOS) and `embed_input_ids` puts the rows there. Only the language model is paged; the encoders see
whole images (`fovea.layers.encoder_attention`). The Q-Former is `fovea.models.blip2_qformer`, shared with training.

Parameter names follow transformers' `Blip2ForConditionalGeneration`, so its checkpoints load as they are.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Blip2Config, Blip2VisionConfig, PretrainedConfig

from fovea.distributed.pipeline import IntermediateTensors, first_stage_only
from fovea.layers.encoder_attention import encoder_attention
from fovea.layers.linear import Linear, copy_checked, set_weight_loader
from fovea.layers.mlp import MLP
from fovea.models.blip2_processing import Blip2DummyInputsBuilder, Blip2MultiModalProcessor, Blip2ProcessingInfo
from fovea.models.blip2_qformer import Blip2QFormerModel
from fovea.distributed import parallel_state as ps
from fovea.models.interfaces import (SupportsLoRA, SupportsMultiModal, SupportsOutputRows, SupportsPP,
                                     SupportsQuant, SupportsTensorParallel, check_tensor_parallel, supports_tensor_parallel)
from fovea.models.opt import OPT_LORA_TARGET_MODULES, OPTForCausalLM
from fovea.models.t5 import T5ForConditionalGeneration
from fovea.multimodal.registry import MULTIMODAL_REGISTRY

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- vision


class BlipVisionEmbeddings(nn.Module):
    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        dim, patch = config.hidden_size, config.patch_size
        num_patches = (config.image_size // patch) ** 2
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, dim))
        self.patch_embedding = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.position_embedding = nn.Parameter(torch.zeros(1, num_patches + 1, dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W]
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (B, P, D)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding  # (B, 1 + P, D)


def _load_qkv_bias(param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None) -> None:
    """BLIP's qkv bias is [q_bias, 0, v_bias]: keys get none (it would cancel in the softmax anyway).

    transformers 5 saves it fused as `qkv.bias`; checkpoints written before store `q_bias` and `v_bias`.
    """
    dim = param.shape[0] // 3
    if shard_id is None:
        copy_checked(param.data, loaded)
        return
    start = 0 if shard_id == "q_bias" else 2 * dim
    copy_checked(param.data[start:start + dim], loaded)
    if shard_id == "q_bias":
        param.data[dim:2 * dim].zero_()


class BlipVisionAttention(nn.Module):
    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = dim // self.num_heads
        self.qkv = Linear(dim, 3 * dim, bias=config.qkv_bias)
        if self.qkv.bias is not None:
            set_weight_loader(self.qkv.bias, _load_qkv_bias, packed_shards=("q_bias", "v_bias"))
        self.projection = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D]
        batch, seq, dim = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, dim).unbind(2)  # each (B, T, D), views
        return self.projection(encoder_attention(q, k, v, self.num_heads, self.head_dim**-0.5))


class BlipVisionLayer(nn.Module):
    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = BlipVisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class BlipVisionEncoder(nn.Module):
    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(BlipVisionLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


@dataclass(slots=True)
class ImageFeatureStages:
    vision: torch.Tensor
    """(B, 1 + P, Dv) the ViT's output after its post-LayerNorm."""
    qformer: torch.Tensor
    """(B, Q, Dq) the Q-Former's query outputs."""
    projected: torch.Tensor
    """(B, Q, hidden) the query outputs in the language model's input space."""


class BlipVisionModel(nn.Module):
    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        self.embeddings = BlipVisionEmbeddings(config)
        self.encoder = BlipVisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, 1 + P, D]
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))


# ---------------------------------------------------------------------------------------------- glue


@MULTIMODAL_REGISTRY.register_processor(
    Blip2MultiModalProcessor, info=Blip2ProcessingInfo, dummy_inputs=Blip2DummyInputsBuilder
)
class Blip2ForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsQuant, SupportsLoRA,
                                    SupportsTensorParallel, SupportsPP, SupportsOutputRows):
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],  # OPT decoder
        "qkv.bias": ["q_bias", "v_bias"],  # vision encoder, checkpoints saved before the fused bias
    }
    # LoRA reaches the LM's decoder only, never the ViT's fc1/fc2; an LM other than OPT (InstructBLIP's Llama)
    # replaces these with its own in __init__
    lora_layers_prefix = "language_model.model.decoder.layers."
    lora_target_modules = OPT_LORA_TARGET_MODULES
    # float32 in every model dtype (transformers keeps them so only in float16: its bfloat16 Q-Former is further from
    # float32, and InstructBLIP's bfloat16 test fails with a bfloat16 one)
    keep_in_fp32_modules = ("query_tokens", "qformer")
    language_model_modules = ("language_model.model",)  # OPT's decoder; not vision_model, qformer, projection
    lm_head_module = "language_model.lm_head"
    # SupportsOutputRows: the decoder-only LMs (OPT, InstructBLIP's Llama) honour the step's output rows in their
    # own forward; a T5 LM is an encoder-decoder, whose steps the runner never prunes
    qformer_class: type[nn.Module] = Blip2QFormerModel  # InstructBLIP's reads the instruction too
    # text_config.model_type -> class; T5 (blip2-flan-t5-*) is an encoder-decoder: the image rows and the prompt
    # go to its encoder, the decoder generates from decoder_start_token_id (fovea.engine.encoder_decoder)
    language_models: dict[str, type[nn.Module]] = {"opt": OPTForCausalLM, "t5": T5ForConditionalGeneration}

    def __init__(self, config: Blip2Config):
        super().__init__()
        text_config = config.text_config
        if text_config.model_type not in self.language_models:
            raise ValueError(f"fovea's {type(self).__name__} runs {' or '.join(self.language_models)} language "
                             f"models, not {text_config.model_type!r}")
        # under tensor parallelism the LM is split; the ViT, Q-Former and projection are replicated (README,
        # "Scaling out"): an LM that cannot be split (T5) refuses here, before anything is built
        check_tensor_parallel(type(self), ps.tp_size(), config)
        self.config = config
        self.num_query_tokens = config.num_query_tokens
        self.image_token_index = config.image_token_index
        # pipeline stages (fovea.distributed.pipeline): the image side runs on the first stage only
        self.vision_model = first_stage_only(lambda: BlipVisionModel(config.vision_config))
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = first_stage_only(lambda: self.qformer_class(config.qformer_config))
        self.language_projection = first_stage_only(
            lambda: Linear(config.qformer_config.hidden_size, text_config.hidden_size))
        self.language_model = self.language_models[text_config.model_type](text_config)
        self._query_attention: tuple[tuple, torch.Tensor] | None = None  # see _first_query_attention
        if isinstance(self.language_model, SupportsLoRA):
            self.lora_layers_prefix = "language_model." + self.language_model.lora_layers_prefix
            self.lora_target_modules = self.language_model.lora_target_modules
        else:  # T5: fovea has no LoRA for it yet, so no adapter may name a layer
            self.lora_layers_prefix, self.lora_target_modules = "language_model.<none>.", ()
        self.keep_in_fp32_modules = self.keep_in_fp32_modules + tuple(
            "language_model." + name for name in getattr(self.language_model, "keep_in_fp32_modules", ()))
        self.keep_in_fp32_modules_float16 = tuple(
            "language_model." + name for name in getattr(self.language_model, "keep_in_fp32_modules_float16", ()))
        # OPT may embed narrower than its hidden size (word_embed_proj_dim); other LMs embed at it
        self.embed_dim = getattr(text_config, "word_embed_proj_dim", None) or text_config.hidden_size
        if self.embed_dim > text_config.hidden_size:
            raise ValueError(  # transformers' masked_scatter runs out of feature values and fails too
                f"BLIP-2 needs word_embed_proj_dim <= hidden_size, got {self.embed_dim} > {text_config.hidden_size}"
            )
        if self.embed_dim != text_config.hidden_size:
            logger.warning(
                "BLIP-2 with word_embed_proj_dim %d != hidden_size %d: image rows are made as transformers makes "
                "them (its masked_scatter refills the %d-wide embedding rows from the flattened %d-wide features)",
                self.embed_dim, text_config.hidden_size, self.embed_dim, text_config.hidden_size,
            )

    @classmethod
    def tp_unsupported_reason(cls, hf_config) -> str | None:
        model_type = hf_config.text_config.model_type
        language_model = cls.language_models.get(model_type)
        if language_model is not None and not supports_tensor_parallel(language_model):
            return f"{cls.__name__} over a {model_type} language model does not support tensor parallelism"
        return None

    def get_text_config(self) -> PretrainedConfig:
        return self.config.text_config

    def adapt_to_checkpoint(self, tensor_names: set[str]) -> None:
        adapt = getattr(self.language_model, "adapt_to_checkpoint", None)
        if adapt is not None:
            adapt({n[len("language_model."):] for n in tensor_names if n.startswith("language_model.")})

    # ------------------------------------------------------------------ encoder-decoder LM (T5)

    @property
    def decoder_start_token_id(self) -> int | None:
        return getattr(self.language_model, "decoder_start_token_id", None)

    def encode(self, inputs_embeds: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        return self.language_model.encode(inputs_embeds, lengths)

    def store_cross_kv(self, encoder_states: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        self.language_model.store_cross_kv(encoder_states, slot_mapping)

    def rename_checkpoint_weight(self, name: str) -> str | None:
        prefix = "language_model."
        if name.startswith(prefix):
            inner = self.language_model.rename_checkpoint_weight(name[len(prefix):])
            return None if inner is None else prefix + inner
        return name

    # ------------------------------------------------------------------ images

    def _image_rows(self, projected: torch.Tensor) -> torch.Tensor:
        """[B, Q, hidden] features -> [B, Q, embed_dim] rows for the LM's input embedding.

        Equal widths (every released BLIP-2): unchanged. Otherwise transformers' masked_scatter fills the Q
        placeholder rows with the first Q * embed_dim values of each image's flattened features; we do the same.
        """
        batch, num_q, hidden = projected.shape
        if hidden == self.embed_dim:
            return projected
        return projected.reshape(batch, -1)[:, : num_q * self.embed_dim].reshape(batch, num_q, self.embed_dim)

    def _encode_pixels(self, pixel_values: torch.Tensor, **qformer_inputs: torch.Tensor) -> torch.Tensor:
        return self.image_feature_stages(pixel_values, **qformer_inputs).projected

    def image_feature_stages(self, pixel_values: torch.Tensor, **qformer_inputs: torch.Tensor) -> ImageFeatureStages:
        """The three stages `LLM.embed` serves, from one pass: transformers' `Blip2Model.get_image_features`
        (.last_hidden_state), `get_qformer_features` and `Blip2ForConditionalGeneration.get_image_features`
        (.pooler_output)."""
        size = self.config.vision_config.image_size
        expected = (3, size, size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values must be [num_images, 3, {size}, {size}], got {list(pixel_values.shape)}")
        vision_dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
        image_features = self.vision_model(pixel_values.to(vision_dtype))  # (B, 1 + P, Dv)
        qformer_dtype = self.qformer.layernorm.weight.dtype
        queries = self.query_tokens.expand(image_features.shape[0], -1, -1).to(qformer_dtype)
        query_output = self._run_qformer(queries, image_features.to(qformer_dtype), **qformer_inputs)  # (B, Q, Dq)
        projected = self.language_projection(query_output.to(vision_dtype))  # (B, Q, hidden)
        return ImageFeatureStages(vision=image_features, qformer=query_output, projected=projected)

    def _run_qformer(self, queries: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        if self.training or torch.is_grad_enabled():
            return self.qformer(queries, image_features)
        # serving: the first layer's self-attention sees the learned queries only, the same for every image, so it
        # runs once per model (0.19 GFLOP float32 of the ~2.6 an image's Q-Former costs at BLIP-2's sizes)
        return self.qformer.forward_queries(self._first_query_attention(queries[:1]), image_features)

    def _first_query_attention(self, queries: torch.Tensor) -> torch.Tensor:
        """`qformer.first_self_attention(queries)` [1, Q, D], kept until a tensor it was computed from changes
        (checked by storage and version, so loading new weights in place recomputes it)."""
        inputs = [self.query_tokens, *self.qformer.layernorm.parameters(),
                  *self.qformer.encoder.layer[0].attention.parameters()]
        if any(t.is_inference() for t in inputs):  # a model built under inference_mode: no version to tell a change
            return self.qformer.first_self_attention(queries)
        key = tuple((t.data_ptr(), t._version) for t in inputs)
        if self._query_attention is None or self._query_attention[0] != key:
            self._query_attention = (key, self.qformer.first_self_attention(queries))
        return self._query_attention[1]

    def embed_multimodal(
        self, pixel_values: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """One [num_query_tokens, hidden] tensor per image, from pixels or from precomputed `image_embeds`.

        pixel_values [num_images, 3, image_size, image_size]; image_embeds are language_projection outputs,
        [num_images, num_query_tokens, hidden] or [num_query_tokens, hidden].
        """
        if pixel_values is not None and image_embeds is not None:
            raise ValueError("give pixel_values or image_embeds, not both")
        if pixel_values is not None:
            projected = self._encode_pixels(pixel_values)
        elif image_embeds is not None:
            hidden = self.config.text_config.hidden_size
            embeds = image_embeds.unsqueeze(0) if image_embeds.dim() == 2 else image_embeds
            if embeds.dim() != 3 or tuple(embeds.shape[1:]) != (self.num_query_tokens, hidden):
                raise ValueError(
                    f"image_embeds must be [num_images, {self.num_query_tokens}, {hidden}] or "
                    f"[{self.num_query_tokens}, {hidden}], got {list(image_embeds.shape)}"
                )
            projected = embeds.to(self.language_projection.params_dtype)
        else:
            return []
        return list(self._image_rows(projected).unbind(0))

    # ------------------------------------------------------------------ language model

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        mm_embeds: list[torch.Tensor] | None = None,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.language_model.embed_input_ids(input_ids, mm_embeds, is_multimodal)

    def forward(
        self, input_ids: torch.Tensor | None, positions: torch.Tensor, inputs_embeds: torch.Tensor | None = None,
        intermediate_tensors: IntermediateTensors | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is None:  # one stage, or the first: any language model
            return self.language_model(input_ids, positions, inputs_embeds)
        return self.language_model(input_ids, positions, inputs_embeds, intermediate_tensors)

    def intermediate_shapes(self, num_tokens: int) -> dict[str, tuple[int, ...]]:
        return self.language_model.intermediate_shapes(num_tokens)

    @classmethod
    def pp_unsupported_reason(cls, hf_config) -> str | None:
        model_type = hf_config.text_config.model_type
        if model_type != "opt":
            return f"{cls.__name__} splits into stages over an OPT language model only, not {model_type!r}"
        return None

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden_states)

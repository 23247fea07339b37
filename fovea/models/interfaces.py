"""What a model class declares it supports beyond a causal LM over the flat batch (vLLM's interfaces).

A model lists these among its bases (abstract: a class that declares one but lacks its methods cannot be
built); the engine asks `supports_multimodal(model_cls)` /
`supports_mrope(model_cls)`, which check the declaration (a subclass test), never an attribute that happens
to be there. Every model has `forward(input_ids, positions, inputs_embeds=None)`, `embed_input_ids`,
`compute_logits` and `get_text_config`; these add the rest.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:
    import torch

    from fovea.engine.request import MultiModalFeature


class SupportsMultiModal(ABC):
    """A model with encoders whose outputs replace placeholder tokens' embeddings. Its processor, processing
    info and dummy inputs are registered with `MULTIMODAL_REGISTRY.register_processor`.

    `embed_multimodal(**mm_kwargs)` returns one [num_rows, hidden] tensor per item, in the order given;
    `embed_input_ids(input_ids, mm_embeds, is_multimodal)` merges them, in order, into the rows where
    `is_multimodal` is True.
    """

    supports_multimodal: ClassVar[Literal[True]] = True

    @abstractmethod
    def embed_multimodal(self, **mm_kwargs: Any) -> list[torch.Tensor]: ...


class SupportsMRoPE(ABC):
    """A model whose LM takes [3, N] multimodal rotary positions (temporal, height, width).

    `get_mrope_input_positions` is a classmethod of the checkpoint's config, not of the loaded model: the
    input processor calls it once per request, on the processing side, and the runner only slices the result.
    """

    supports_mrope: ClassVar[Literal[True]] = True

    @classmethod
    @abstractmethod
    def get_mrope_input_positions(cls, hf_config: Any, input_tokens: Sequence[int],
                                  mm_features: Sequence[MultiModalFeature]) -> tuple[torch.Tensor, int]:
        """[3, len(input_tokens)] positions of a prompt, and the delta that places every later token:
        position p >= len(input_tokens) is p + delta on all three rows."""


class SupportsLoRA(ABC):
    """A model whose language model takes LoRA adapters (PEFT's format) on its attention and MLP projections.

    `lora_layers_prefix`: fovea's module path of the language model's decoder layers (adapters touch nothing
    outside it: not the vision tower, the Q-Former, the projector or `lm_head`). `lora_target_modules`: the
    projections an adapter may name, as PEFT names them for this family (a packed fovea layer answers to each
    of its shards' names).
    """

    supports_lora: ClassVar[Literal[True]] = True
    lora_layers_prefix: ClassVar[str]
    lora_target_modules: ClassVar[tuple[str, ...]]


class SupportsOutputRows(ABC):
    """A model whose forward honours `AttentionMetadata.output_group` (fovea.layers.attention): given one, it
    returns the hidden states of those rows only ([S, hidden], in the group's order) and skips its last layer's
    work for the other rows past their (packed) q/k/v projection, whose K/V the cache needs. The runner asks for it in steps that compute more rows than
    they read (prefill: one logits row per request) when nothing else reads every row (prompt logprobs, LoRA's
    per-row adapters, a pipeline's stages)."""

    supports_output_rows: ClassVar[Literal[True]] = True


def supports_output_rows(model: type | object) -> bool:
    cls = model if isinstance(model, type) else type(model)
    return issubclass(cls, SupportsOutputRows)


def supports_lora(model: type | object) -> bool:
    cls = model if isinstance(model, type) else type(model)
    return issubclass(cls, SupportsLoRA)


def supports_multimodal(model: type | object) -> bool:
    cls = model if isinstance(model, type) else type(model)
    return issubclass(cls, SupportsMultiModal)


def supports_mrope(model: type | object) -> bool:
    cls = model if isinstance(model, type) else type(model)
    return issubclass(cls, SupportsMRoPE)


class SupportsQuant(ABC):
    """A model whose language model fovea can quantize at load (`EngineConfig.quantization="int8"`).

    `language_model_modules`: the modules holding the language model's decoder (every linear layer under them
    is quantized); `lm_head_module`: the output projection, quantized only with `quantize_lm_head=True`. The
    encoders, projector and embeddings are never named here, so they stay in the model dtype.
    """

    supports_quant: ClassVar[Literal[True]] = True
    language_model_modules: ClassVar[tuple[str, ...]]
    lm_head_module: ClassVar[str]


def supports_quant(model: type | object) -> bool:
    cls = model if isinstance(model, type) else type(model)
    return issubclass(cls, SupportsQuant)


class SupportsPP(ABC):
    """A model that splits into pipeline stages (fovea.distributed.pipeline): built on each rank with only its
    stage's decoder layers (first stage: also embeddings and encoders; last: final norm and lm_head), its
    `forward(input_ids, positions, inputs_embeds=None, intermediate_tensors=None)` takes the previous stage's
    tensors on every stage but the first and returns them for the next stage on every stage but the last.

    `intermediate_shapes(num_tokens)`: name -> shape of what a stage receives (the receiver allocates them).
    `pp_unsupported_reason(hf_config)`: why this checkpoint cannot be split after all (its language model), or None.
    """

    supports_pp: ClassVar[Literal[True]] = True

    @abstractmethod
    def intermediate_shapes(self, num_tokens: int) -> dict[str, tuple[int, ...]]: ...

    @classmethod
    def pp_unsupported_reason(cls, hf_config: Any) -> str | None:
        return None


PP_MODELS = "OPT (BLIP-2's LM), Llama, Qwen2, BLIP-2 over OPT, Qwen2.5-VL"


def check_pipeline_parallel(model_cls: type, hf_config: Any, pp_size: int) -> None:
    """ValueError naming what is supported when `model_cls` (this checkpoint) cannot run `pp_size` stages."""
    if pp_size == 1:
        return
    reason = None
    if not issubclass(model_cls, SupportsPP):
        reason = f"{model_cls.__name__} does not support pipeline parallelism"
    else:
        reason = model_cls.pp_unsupported_reason(hf_config)
    if reason is not None:
        raise ValueError(f"pipeline_parallel_size={pp_size}: {reason}; pipeline parallelism supports {PP_MODELS}")
    text_config = hf_config.get_text_config()
    from fovea.distributed.pipeline import get_pp_indices

    get_pp_indices(text_config.num_hidden_layers, 0, pp_size)  # ValueError when stages outnumber the layers


class SupportsEncoderDecoder(ABC):
    """A language model with an encoder that reads the prompt and a decoder that generates (T5).

    `encode(inputs_embeds [N, d], lengths)` runs the encoder once over whole prompts packed row after row (the
    prompts' embeddings from `embed_input_ids`, multimodal rows merged); `store_cross_kv(encoder_states [M, d], slot_mapping [M])`
    writes each decoder layer's cross-attention keys/values into the request's cross blocks; `forward` is the
    decoder over the step's flat batch, which starts from `decoder_start_token_id`. A multimodal model whose
    language model is one (BLIP-2 with Flan-T5) has these by delegation; the engine asks
    `is_encoder_decoder(hf_config)`, since the same class may run a decoder-only LM.
    """

    supports_encoder_decoder: ClassVar[Literal[True]] = True
    decoder_start_token_id: int

    @abstractmethod
    def encode(self, inputs_embeds: torch.Tensor, lengths: list[int]) -> torch.Tensor: ...

    @abstractmethod
    def store_cross_kv(self, encoder_states: torch.Tensor, slot_mapping: torch.Tensor) -> None: ...


class SupportsTensorParallel(ABC):
    """A model that builds its language model split over `tensor_parallel_size` ranks (the ranks' layers read
    `fovea.distributed.parallel_state` when built): attention and MLP projections split by heads and columns /
    rows, token table and `lm_head` by vocabulary, each rank's KV cache holding its KV heads. Encoders (vision
    towers, Q-Former) and projectors stay replicated. `tp_unsupported_reason(hf_config)`: why this checkpoint
    cannot be split after all (a language model of another family, e.g. BLIP-2 over T5), or None."""

    supports_tensor_parallel: ClassVar[Literal[True]] = True

    @classmethod
    def tp_unsupported_reason(cls, hf_config: Any) -> str | None:
        return None


TENSOR_PARALLEL_MODELS = "OPT, Llama, Mistral and Qwen2 language models, and BLIP-2 / InstructBLIP / LLaVA / " \
                         "LLaVA-NeXT / Qwen2.5-VL over them"
"""What runs with tensor_parallel_size > 1 (for error messages)."""


def supports_tensor_parallel(model: type | object) -> bool:
    cls = model if isinstance(model, type) else type(model)
    return issubclass(cls, SupportsTensorParallel)


def check_tensor_parallel(model_cls: type, tp_size: int, hf_config: Any = None) -> None:
    """A ValueError naming the model and what is supported if `model_cls` (with `hf_config`, when given) cannot
    run with `tp_size` > 1 ranks: the driver calls it before spawning any rank, each rank again when it builds."""
    if tp_size == 1:
        return
    reason = None
    if not supports_tensor_parallel(model_cls):
        reason = f"{model_cls.__name__} does not support tensor parallelism"
    elif hf_config is not None:
        reason = model_cls.tp_unsupported_reason(hf_config)
    if reason is not None:
        raise ValueError(f"tensor_parallel_size={tp_size}: {reason}; supported: {TENSOR_PARALLEL_MODELS} "
                         f"(use tensor_parallel_size=1)")


def is_encoder_decoder(hf_config: Any) -> bool:
    """Whether the checkpoint's language model is an encoder-decoder (T5, or BLIP-2 / InstructBLIP over Flan-T5)."""
    text_config = getattr(hf_config, "text_config", None) or hf_config
    return bool(getattr(text_config, "is_encoder_decoder", False))

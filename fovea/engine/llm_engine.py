"""LLMEngine: the three stages of the pipeline behind vLLM's `LLMEngine` name.

    add_request: prompt ──► InputProcessor ──► Request ──► fan_out (n) ──► EngineCore (queued) + OutputProcessor
    step:        EngineCore.step() ──► RequestUpdate per sequence ──► OutputProcessor ──► RequestOutput per request

The name stays because users and the server call it as vLLM's (`llm.llm_engine.add_request`, `step`,
`abort_request`); the work is in `EngineCore` (core.py), the input processor and the output processor.
"""
from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Sequence
from typing import Any

import torch
import transformers

from fovea.config import EngineConfig
from fovea.engine.beam_search import BeamSearchManager, sequence_params
from fovea.engine.core import EngineCore
from fovea.engine.input_processor import InputProcessor, PromptType
from fovea.engine.output_processor import OutputProcessor, fan_out
from fovea.engine.embedding_cache import EmbeddingCache
from fovea.engine.pooling import check_embed_inputs, embed_images
from fovea.engine.structured_output import GrammarCompiler
from fovea.layers.rotary import context_scaling_factor
from fovea.lora.request import LoRARequest
from fovea.models.interfaces import is_encoder_decoder, supports_mrope, supports_multimodal
from fovea.models.llama import sliding_window_of
from fovea.models.registry import resolve_model_class
from fovea.multimodal.processing import InputProcessingContext
from fovea.multimodal.processors import BlipImageProcessor
from fovea.multimodal.registry import MULTIMODAL_REGISTRY
from fovea.outputs import RequestOutput
from fovea.sampling_params import BeamSearchParams, SamplingParams


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.hf_config = transformers.AutoConfig.from_pretrained(config.model)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(config.tokenizer_path)
        self.model_cls = model_cls = resolve_model_class(list(getattr(self.hf_config, "architectures", None) or []))
        text_config = self.hf_config.get_text_config()
        self.max_model_len = self._resolve_max_model_len(text_config)

        self.processor = None
        self.mm_limits: dict[str, int] = {}
        max_tokens_per_item: dict[str, int] = {}
        if supports_multimodal(model_cls):
            ctx = InputProcessingContext(config.model, self.hf_config, self.tokenizer,
                                         dict(config.mm_processor_kwargs or {}))
            self.processor = MULTIMODAL_REGISTRY.create_processor(model_cls, ctx)
            self.mm_limits = self.processor.info.get_allowed_mm_limits(config.limit_mm_per_prompt)
            most_tokens = self.processor.info.get_mm_max_tokens_per_item(self.max_model_len, self.mm_limits)
            # a modality limited to 0 items per prompt never reaches the encoder: it sizes nothing
            max_tokens_per_item = {m: most_tokens[m] for m, limit in self.mm_limits.items() if limit > 0}

        self.engine_core = EngineCore(config, self.hf_config, model_cls, self.max_model_len, self.processor,
                                      self.mm_limits, max_tokens_per_item)
        eos = getattr(text_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.input_processor = InputProcessor(
            tokenizer=self.tokenizer, processor=self.processor, max_model_len=self.max_model_len,
            vocab_size=text_config.vocab_size, mm_limits=self.mm_limits,
            mm_processor_kwargs=config.mm_processor_kwargs, eos_token_id=eos,
            mrope_positions=functools.partial(model_cls.get_mrope_input_positions, self.hf_config)
            if supports_mrope(model_cls) else None,
            decoder_start_token_id=text_config.decoder_start_token_id if is_encoder_decoder(self.hf_config) else None,
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self.beam_searches = BeamSearchManager(self.engine_core, self.tokenizer)
        self._vocab_size = text_config.vocab_size
        self._grammar_compiler = None  # made by the first request with structured outputs
        self._grammar_lock = threading.Lock()
        self._arrivals = itertools.count()
        self._image_processor = None  # for embed(); read from the checkpoint on first use
        # embeddings by image content, as many rows as the encoder cache holds tokens
        self.embedding_cache = EmbeddingCache(self.scheduler.encoder_cache_manager.cache_size)

    def _resolve_max_model_len(self, text_config) -> int:
        if is_encoder_decoder(self.hf_config):
            return self._encoder_decoder_max_model_len()
        limit = getattr(text_config, "max_position_embeddings", None)
        if limit is not None:  # linear / dynamic RoPE scaling stretch the context by their factor (as vLLM)
            limit = int(limit * context_scaling_factor(text_config))
        window = sliding_window_of(text_config)
        wanted = self.config.max_model_len or (min(limit, window) if limit and window else limit)
        if wanted is None:
            raise ValueError("the checkpoint does not say its max_position_embeddings; pass max_model_len")
        if limit is not None and wanted > limit:
            raise ValueError(f"max_model_len={wanted} exceeds the model's max_position_embeddings={limit}")
        if window is not None and wanted > window:
            # fovea attends over the whole context; that equals the checkpoint's windowed attention only while
            # no sequence is longer than the window
            raise ValueError(f"max_model_len={wanted} exceeds the checkpoint's sliding_window={window}; fovea does "
                             f"not implement sliding-window attention, so max_model_len must be at most {window}")
        return wanted

    def _encoder_decoder_max_model_len(self) -> int:
        """T5's positions are relative, so no config limit exists: `max_model_len` as given, else the tokenizer's
        `model_max_length` (512 for Flan-T5), else 512 (what T5 was trained with). It bounds the encoder's prompt
        (image placeholders included) and, separately, the decoder's tokens (start token + outputs)."""
        if self.config.max_model_len:
            return self.config.max_model_len
        tokenizer_limit = getattr(self.tokenizer, "model_max_length", None)
        # transformers puts a huge sentinel (int(1e30)) there when the tokenizer names no limit
        return int(tokenizer_limit) if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 1_000_000 else 512

    @property
    def scheduler(self):
        return self.engine_core.scheduler

    @property
    def runner(self):
        return self.engine_core.runner

    # ---- requests -------------------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | BeamSearchParams | None = None,
                    lora_request: LoRARequest | None = None) -> None:
        """Validate and queue a request (with `lora_request`: run by that adapter); a bad one raises ValueError
        and leaves the engine untouched. `BeamSearchParams` make it a beam search (`add_beam_search`)."""
        if isinstance(params, BeamSearchParams):
            return self.add_beam_search(request_id, prompt, params, lora_request)
        if request_id in self.output_processor or request_id in self.beam_searches:
            raise ValueError(f"request id {request_id!r} is already in use")
        if lora_request is not None:
            if not isinstance(lora_request, LoRARequest):
                raise ValueError(f"lora_request must be a fovea.LoRARequest, got {type(lora_request).__name__}")
            self.add_lora(lora_request)
        if params is not None and params.structured_outputs is not None:
            self.grammar_compiler().compile(params.structured_outputs)  # ValueError for a bad grammar, before queueing
        request = self.input_processor.process(request_id, prompt, params or SamplingParams(), next(self._arrivals))
        request.lora_request = lora_request
        sequences = fan_out(request)
        self.engine_core.add_requests(sequences)  # all or none
        self.output_processor.add_request(request, sequences)

    def add_beam_search(self, request_id: str, prompt: PromptType, params: BeamSearchParams,
                        lora_request: LoRARequest | None = None, keep_output: bool = False) -> None:
        """Queue a beam search (fovea.engine.beam_search); its one RequestOutput comes when it is done, one
        completion per beam, best first (`keep_output`: its BeamSearchOutput waits in `beam_searches.outputs`)."""
        if request_id in self.output_processor or request_id in self.beam_searches:
            raise ValueError(f"request id {request_id!r} is already in use")
        if lora_request is not None:
            if not isinstance(lora_request, LoRARequest):
                raise ValueError(f"lora_request must be a fovea.LoRARequest, got {type(lora_request).__name__}")
            self.add_lora(lora_request)
        root = self.input_processor.process(f"beam:{request_id}", prompt, sequence_params(params),
                                            next(self._arrivals))
        root.lora_request = lora_request
        self.beam_searches.add(request_id, root, params, self.max_model_len, keep_output)

    def grammar_compiler(self) -> GrammarCompiler:
        """The structured-outputs compiler for this tokenizer (built once: it indexes the whole vocabulary).
        Its `compile` is thread-safe: the server compiles a request's grammar off the engine thread
        (AsyncLLMEngine.add_request), so a slow compile does not stall the other requests' steps."""
        with self._grammar_lock:
            if self._grammar_compiler is None:
                self._grammar_compiler = GrammarCompiler(self.tokenizer, self._vocab_size,
                                                         self.config.structured_outputs_limits)
                self.engine_core.executor.enable_structured_outputs(self._grammar_compiler)
        return self._grammar_compiler

    def add_lora(self, lora_request: LoRARequest) -> None:
        """Load and check an adapter ahead of its requests (vLLM's `add_lora`); ValueError naming the problem."""
        self.engine_core.add_lora(lora_request)

    def embed(self, inputs: Sequence[Any], pooling: str | None = None) -> list[torch.Tensor]:
        """One float32 (rows, dim) embedding per input (see `fovea.engine.pooling`); a ValueError names a bad one."""
        result = self.embed_many([(inputs, pooling)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def embed_many(self, calls: Sequence[tuple[Sequence[Any], str | None]]) -> list[list[torch.Tensor] | ValueError]:
        """Several embed calls (inputs, pooling) as one batch, as the server gathers concurrent requests: each
        call checked alone (a bad one gets its ValueError, the others their embeddings), then the images of all
        good calls with the same pooling run together, repeated and cached images once (`EmbeddingCache`)."""
        checked: list[tuple[str, list] | ValueError] = []
        for inputs, pooling in calls:
            try:
                checked.append(check_embed_inputs(self.model_cls, list(inputs), pooling))
            except ValueError as err:
                checked.append(err)
        if self._image_processor is None and any(not isinstance(c, ValueError) for c in checked):
            # only now: a model that does not embed was refused above, before a preprocessor config not BLIP's
            self._image_processor = BlipImageProcessor.from_pretrained(self.config.model)
        results: list[list[torch.Tensor] | ValueError] = [c if isinstance(c, ValueError) else [] for c in checked]
        by_pooling: dict[str, list[int]] = {}
        for i, c in enumerate(checked):
            if not isinstance(c, ValueError):
                by_pooling.setdefault(c[0], []).append(i)
        for pooling, members in by_pooling.items():
            images = [image for i in members for image in checked[i][1]]
            embeddings = iter(embed_images(self.engine_core.embed_pixels, self._image_processor, images, pooling,
                                           self.embedding_cache))
            for i in members:
                results[i] = [next(embeddings) for _ in checked[i][1]]
        return results

    def abort_request(self, request_ids: str | list[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self.beam_searches.abort(ids)
        self.engine_core.abort_requests(self.output_processor.abort_requests(ids))

    def has_unfinished_requests(self) -> bool:
        """Requests not finished yet, or a pipeline batch still out (an aborted request's, whose blocks are freed
        when it lands)."""
        return self.get_num_unfinished_requests() > 0 or self.engine_core.has_batches_in_flight()

    def get_num_unfinished_requests(self) -> int:
        return self.output_processor.get_num_unfinished_requests() + len(self.beam_searches)

    # ---- the loop -------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; return a RequestOutput for every request that produced tokens or finished."""
        searches = self.beam_searches
        if searches:
            searches.start()
        updates = self.engine_core.step()
        finished_searches = []
        if searches.owner:
            updates, finished_searches = searches.process(updates)
        outputs, stopped = self.output_processor.process_updates(updates)
        if stopped:
            self.engine_core.stop_requests(stopped)
        return outputs + finished_searches

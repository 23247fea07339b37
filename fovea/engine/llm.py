"""LLM: vLLM's offline interface over fovea's engine."""
from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from fovea.config import EngineConfig
from fovea.engine.input_processor import PromptType
from fovea.engine.llm_engine import LLMEngine
from fovea.engine.pooling import EmbeddingOutput, EmbeddingRequestOutput, ScoringOutput, ScoringRequestOutput
from fovea.engine.retrieval import RETRIEVAL_ARCHITECTURE, RetrievalRunner, is_retrieval_checkpoint
from fovea.entrypoints.chat_templates import resolve_chat_template
from fovea.entrypoints.chat_utils import ChatMessage, build_chat_prompt
from fovea.executor import ExecutorDeadError
from fovea.lora.request import LoRARequest
from fovea.models.interfaces import is_encoder_decoder
from fovea.outputs import BeamSearchOutput, RequestOutput
from fovea.sampling_params import BeamSearchParams, SamplingParams

logger = logging.getLogger(__name__)


class LLM:
    """Load a checkpoint directory and generate from it.

        llm = LLM(model="path/to/blip2", dtype="bfloat16")
        outs = llm.generate([{"prompt": "a photo of", "multi_modal_data": {"image": img}}], SamplingParams(max_tokens=30))

    Every keyword is an `EngineConfig` field; an unknown one is an error listing the valid names.
    """

    def __init__(self, model: str, **kwargs: Any):
        config = EngineConfig.from_kwargs(model, **kwargs)
        self._counter = itertools.count()
        # a stage-1 export has no language model: it embeds and scores only, outside the generation engine
        self._retrieval = RetrievalRunner.from_config(config) if is_retrieval_checkpoint(config.model) else None
        self._llm_engine = None if self._retrieval else LLMEngine(config)

    @property
    def llm_engine(self) -> LLMEngine:
        if self._llm_engine is None:
            raise ValueError(f"this checkpoint is a {RETRIEVAL_ARCHITECTURE} (a stage-1 export): it does not "
                             f"generate; use LLM.embed and LLM.score")
        return self._llm_engine

    def get_tokenizer(self):
        return self._retrieval.tokenizer if self._retrieval else self.llm_engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block (as vLLM's `LLM.reset_prefix_cache`). Only possible while no
        request holds blocks; returns whether it happened."""
        return self.llm_engine.scheduler.reset_prefix_cache()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order.

        `lora_request`: one adapter for every prompt, or a list with one entry (an adapter or None for the
        base model) per prompt, as vLLM takes it; prompts with different adapters run in the same batches.

        Prompts are validated as they are added. If one is invalid, the ones already added are aborted and
        a ValueError names the prompt's index and the problem, so the engine is left clean for the next call
        (as vLLM does). Inside a running engine (the server), a bad request never disturbs the others.
        """
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"{len(params_list)} sampling params for {len(prompts)} prompts; give one or one per prompt")
        if lora_request is None or isinstance(lora_request, LoRARequest):
            lora_list = [lora_request] * len(prompts)
        else:
            lora_list = list(lora_request)
            if len(lora_list) != len(prompts):
                raise ValueError(f"{len(lora_list)} LoRA requests for {len(prompts)} prompts; give one or one per prompt")
        engine = self.llm_engine
        ids = []
        for i, (prompt, params, lora) in enumerate(zip(prompts, params_list, lora_list)):
            request_id = str(next(self._counter))
            try:
                engine.add_request(request_id, prompt, params, lora_request=lora)
            except ValueError as err:
                engine.abort_request(ids)
                raise ValueError(f"prompt {i}: {err}") from err
            ids.append(request_id)
        return self._run(ids, use_tqdm)

    def beam_search(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: BeamSearchParams,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """Beam search for every prompt (text, token ids, or a dict with `multi_modal_data`), as vLLM's
        `LLM.beam_search`; one `BeamSearchOutput` per prompt, its `beam_width` sequences best first.

        The rules are transformers' `generate(num_beams=..., do_sample=False)` (fovea.engine.beam_search);
        all prompts' beams run in the same batches, forked in the KV cache (the prompt and its images are
        computed once), next to any other requests of the engine. `use_tqdm` is accepted for vLLM's signature; no
        bar is shown.
        """
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a fovea.BeamSearchParams, got {type(params).__name__}")
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if lora_request is None or isinstance(lora_request, LoRARequest):
            lora_list = [lora_request] * len(prompts)
        else:
            lora_list = list(lora_request)
            if len(lora_list) != len(prompts):
                raise ValueError(f"{len(lora_list)} LoRA requests for {len(prompts)} prompts; give one or one per prompt")
        engine = self.llm_engine
        ids: list[str] = []
        for i, (prompt, lora) in enumerate(zip(prompts, lora_list)):
            request_id = str(next(self._counter))
            try:
                engine.add_beam_search(request_id, prompt, params, lora, keep_output=True)
            except ValueError as err:
                engine.abort_request(ids)
                raise ValueError(f"prompt {i}: {err}") from err
            ids.append(request_id)
        wanted, done = set(ids), set()
        try:
            while len(done) < len(ids):
                outputs = engine.step()
                for output in outputs:
                    if output.request_id not in wanted:
                        continue
                    done.add(output.request_id)
                    if output.outputs[0].finish_reason == "error":
                        raise RuntimeError(f"beam search failed on prompt {ids.index(output.request_id)}: "
                                           f"{output.outputs[0].stop_reason}")
        except BaseException as err:
            engine.abort_request([i for i in ids if i not in done])
            self._land_in_flight_after(err)
            raise
        self._land_in_flight()
        return [engine.beam_searches.outputs.pop(i) for i in ids]

    def embed(self, inputs: Any | Sequence[Any], *, pooling: str | None = None) -> list[EmbeddingRequestOutput]:
        """Image embeddings of a BLIP-2 checkpoint, one per input, in input order (`fovea.engine.pooling`).

        Inputs are PIL images or vLLM prompts `{"prompt": "", "multi_modal_data": {"image": img}}`, one image each;
        `pooling` is "projected" (default), "qformer" or "vision". Every input is checked before any runs: a
        ValueError names the first bad one. Images run batched, up to max_num_seqs per forward.
        """
        if not isinstance(inputs, (list, tuple)):
            inputs = [inputs]
        run = self._retrieval.embed if self._retrieval else self.llm_engine.embed
        return [EmbeddingRequestOutput(request_id=str(next(self._counter)), outputs=EmbeddingOutput(e))
                for e in run(list(inputs), pooling)]

    def score(self, images: Image.Image | Sequence[Image.Image], texts: str | Sequence[str], *,
              method: str = "itc") -> list[ScoringRequestOutput]:
        """Image-text match scores of a stage-1 export (`fovea.engine.retrieval`), pair by pair as vLLM's
        `LLM.score`: one image and N texts, N images and one text, or N of each (pairs in order).

        method "itc": the best query's cosine similarity with the text (transformers' `logits_per_image`);
        "itm": the matching head's P(match). Each distinct image and text is encoded once, in batches, and images
        are kept between calls (an image `embed` or an earlier score encoded is not encoded again).
        """
        if self._retrieval is None:
            raise ValueError(f"LLM.score needs a {RETRIEVAL_ARCHITECTURE} checkpoint (a stage-1 export, what "
                             f"`fovea train stage1` writes); this is a {self.llm_engine.hf_config.architectures}")
        images = [images] if isinstance(images, Image.Image) else list(images)
        texts = [texts] if isinstance(texts, str) else list(texts)
        if len(images) == 1:
            images = images * len(texts)
        elif len(texts) == 1:
            texts = texts * len(images)
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images and {len(texts)} texts; give one of either, or as many of each")
        scores = self._retrieval.score(images, texts, method)
        return [ScoringRequestOutput(request_id=str(next(self._counter)), outputs=ScoringOutput(score))
                for score in scores]

    def chat(
        self,
        messages: Sequence[ChatMessage] | Sequence[Sequence[ChatMessage]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        mm_processor_kwargs: Mapping[str, Any] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of messages) or to several (a list of such lists).

        Messages are OpenAI-style (see `fovea.entrypoints.chat_utils`): text, `image_url` / `video_url` with a
        data URL or a local path, `image_pil`. Each conversation becomes a prompt by `build_chat_prompt`, the
        function the server's /v1/chat/completions uses too (rendered with `chat_template`, else the checkpoint's
        own, else fovea's fallback for the model type (`fovea.entrypoints.chat_templates`), `chat_template_kwargs`
        as extra template variables, tokenized without adding special tokens), and
        is generated like a `generate` prompt (`lora_request` too: one, or one per conversation);
        `RequestOutput.prompt` is the rendered text.
        """
        is_batch = (isinstance(messages, Sequence) and not isinstance(messages, str) and bool(messages)
                    and not isinstance(messages[0], Mapping))
        conversations = list(messages) if is_batch else [messages]
        tokenizer = self.get_tokenizer()
        model_type = self.llm_engine.hf_config.model_type
        template = resolve_chat_template(tokenizer, model_type, chat_template,
                                         is_encoder_decoder=is_encoder_decoder(self.llm_engine.hf_config)).template
        if template is None:
            raise ValueError(f"this model has no chat template (none in the checkpoint, and fovea has no fallback "
                             f"for model type {model_type!r}); pass chat_template= (a Jinja string), or format the "
                             f"prompt yourself and use generate()")
        chats = []
        for i, conversation in enumerate(conversations):
            try:
                chats.append(build_chat_prompt(
                    tokenizer, conversation, allowed_modalities=self.llm_engine.mm_limits, chat_template=template,
                    add_generation_prompt=add_generation_prompt, chat_template_kwargs=chat_template_kwargs,
                    mm_processor_kwargs=mm_processor_kwargs, allow_local_paths=True))
            except ValueError as err:
                raise ValueError(f"conversation {i}: {err}" if is_batch else str(err)) from err
        outputs = self.generate([chat.prompt for chat in chats], sampling_params, use_tqdm=use_tqdm,
                                lora_request=lora_request)
        for output, chat in zip(outputs, chats):
            output.prompt = chat.text
        return outputs

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        wanted = set(ids)
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        num_generated = 0
        try:
            while len(finished) < len(ids):
                for output in engine.step():
                    if output.finished and output.request_id in wanted:
                        finished[output.request_id] = output
                        num_generated += sum(len(c.token_ids) for c in output.outputs)
                        bar.update(1)
                        bar.set_postfix_str(f"{num_generated} tokens out", refresh=False)
            self._land_in_flight()
        except BaseException as err:
            engine.abort_request([i for i in ids if i not in finished])
            self._land_in_flight_after(err)
            raise
        finally:
            bar.close()
        return [finished[i] for i in ids]

    def _land_in_flight(self) -> None:
        """Step until no pipeline micro-batch is in flight (pipeline_parallel_size > 1), so that a call returns
        with every KV block of its requests free: a batch still out may hold requests aborted while it was in
        flight, whose blocks are freed only when it lands. Its outputs belong to no caller."""
        engine = self.llm_engine
        while engine.engine_core.has_batches_in_flight():
            engine.step()

    def _land_in_flight_after(self, err: BaseException) -> None:
        """After a failed call, its aborted requests' batches in flight land before `err` propagates, unless the
        workers are gone or the user interrupted (Ctrl-C stops at once; the next call lands them)."""
        if not isinstance(err, Exception) or isinstance(err, ExecutorDeadError):
            return
        try:
            self._land_in_flight()
        except Exception:  # noqa: BLE001 - the original error is the one to raise
            logger.exception("landing the batches in flight after %r failed", err)

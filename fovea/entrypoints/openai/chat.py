"""POST /v1/chat/completions: messages -> `build_chat_prompt` (the function `LLM.chat` uses) -> the engine."""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from fovea.engine.async_engine import (
    AsyncLLMEngine,
    EngineDeadError,
    RequestAbortedError,
    RequestFailedError,
    RequestStream,
)
from fovea.entrypoints.chat_templates import ResolvedChatTemplate
from fovea.entrypoints.chat_utils import ChatPrompt, build_chat_prompt
from fovea.entrypoints.media_errors import find_refusal
from fovea.entrypoints.media_fetch import MediaFetcher
from fovea.entrypoints.media_limits import prepare_media_async
from fovea.entrypoints.openai import protocol as p
from fovea.lora.request import LoRARequest
from fovea.entrypoints.openai.streaming import (
    Cursor,
    SSEResponse,
    advance,
    holdback,
    last_output,
    sse,
    sse_error,
    unless_disconnected,
)
from fovea.multimodal.video_decoding import FrameSampler
from fovea.sampling_params import SamplingParams


class ChatServing:
    """Chat completions over one engine.

    `tokenizer` is the server's own (not the engine thread's); `fetcher` fetches http(s) media and reads data
    URLs and allowed local files under the server's size limits; `chat_template` is what `--chat-template`, the
    checkpoint or fovea's fallbacks give (`resolve_chat_template`), resolved once at start-up.
    """

    def __init__(self, engine: AsyncLLMEngine, tokenizer, fetcher: MediaFetcher, chat_template: ResolvedChatTemplate):
        self.engine, self.tokenizer, self.fetcher, self.chat_template = engine, tokenizer, fetcher, chat_template
        self.decode_slots = asyncio.Semaphore(fetcher.config.max_concurrent_media_decodes)

    def build_prompt(self, body: p.ChatCompletionRequest) -> ChatPrompt:
        """Blocking (media fetches): the route runs it in a worker thread. Rendering and encoding happen there
        too; the fast tokenizer's encode only reads its state, so concurrent requests may share it."""
        if self.chat_template.template is None:  # said in the client's terms: the server's flag, its other route
            raise ValueError(f"this model has no chat template (none in the checkpoint, and fovea has no fallback "
                             f"for model type {self.chat_template.model_type!r}), so the server cannot turn messages "
                             f"into a prompt; start it with --chat-template FILE, or send a formatted text prompt "
                             f"to /v1/completions")
        return build_chat_prompt(
            self.tokenizer, body.message_dicts(), allowed_modalities=self.engine.engine.mm_limits,
            chat_template=self.chat_template.template, add_generation_prompt=body.add_generation_prompt,
            chat_template_kwargs=body.chat_template_kwargs, fetch=self.fetcher,
            allow_local_paths=self.fetcher.allowed_local_media_path is not None, read_media=self.fetcher.resolve_item)

    def frame_sampler(self, mm_kwargs: Mapping[str, Any] | None) -> FrameSampler | None:
        """The frames the engine's video loader will keep of a file: its model's sampler with the options the
        input processor gives it (the engine's, then the request's). None: the model keeps every frame."""
        llm_engine = self.engine.engine
        get_video_processor = getattr(getattr(llm_engine.processor, "info", None), "get_video_processor", None)
        if get_video_processor is None:
            return None
        options = {**llm_engine.input_processor.mm_processor_kwargs, **(mm_kwargs or {})}
        return getattr(get_video_processor(options), "sample_frame_indices", None)

    async def create(self, body: p.ChatCompletionRequest, model: str, raw: Request,
                     lora_request: LoRARequest | None = None) -> Response:
        params = body.to_sampling_params()
        try:
            chat = await asyncio.to_thread(self.build_prompt, body)
            prompt = chat.prompt
            if prompt.get("multi_modal_data"):  # header limits, then images decoded, in at most N requests at once
                prompt = {**prompt, "multi_modal_data": await prepare_media_async(
                    prompt["multi_modal_data"], self.fetcher.config, self.decode_slots,
                    self.frame_sampler(prompt.get("mm_processor_kwargs")))}
        except ValueError as err:
            if (refusal := find_refusal(err)) is not None:
                self.fetcher.refusals.add(refusal.reason)
            raise
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await self.engine.add_request(request_id, prompt, params, lora_request)
        created = int(time.time())
        on_close = lambda: self.engine.abort(request_id)  # noqa: E731
        if body.stream:
            return SSEResponse(chat_chunks(body, params, request_id, created, model, stream), on_close)
        final = await unless_disconnected(raw, last_output(stream), on_close)
        return JSONResponse(p.chat_response(body, request_id, created, model, final).model_dump())


async def chat_chunks(body: p.ChatCompletionRequest, params: SamplingParams, request_id: str, created: int,
                      model: str, stream: RequestStream) -> AsyncIterator[str]:
    def chunk(choices, usage=None) -> str:
        return sse(p.ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, usage=usage))

    yield chunk([p.ChatCompletionStreamChoice(index=i, delta=p.DeltaMessage(role="assistant", content=""))
                 for i in range(params.n)])
    num_held, cursors, final = holdback(params), [Cursor() for _ in range(params.n)], None
    try:
        async for final in stream:
            choices = []
            for c in final.outputs:
                if (step := advance(cursors[c.index], c, num_held, body.logprobs)) is None:
                    continue
                text, start = step
                logprobs = None
                if body.logprobs:
                    logprobs = p.chat_logprobs(c.token_ids[start:], c.logprobs[start:len(c.token_ids)],
                                               body.top_logprobs or 0)
                choices.append(p.ChatCompletionStreamChoice(
                    index=c.index, delta=p.DeltaMessage(content=text), logprobs=logprobs,
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason))
            if choices:
                yield chunk(choices)
    except (RequestAbortedError, EngineDeadError, RequestFailedError) as err:
        yield sse_error(err)
    else:
        if body.include_usage:
            num_completion = sum(len(c.token_ids) for c in final.outputs)
            yield chunk([], p.make_usage(len(final.prompt_token_ids), num_completion))
    yield "data: [DONE]\n\n"

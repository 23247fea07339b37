"""POST /v1/completions: prompt strings or token ids, each its own engine request, answered as one response."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from fovea.engine.async_engine import (
    AsyncLLMEngine,
    EngineDeadError,
    RequestAbortedError,
    RequestFailedError,
    RequestStream,
)
from fovea.entrypoints.openai import protocol as p
from fovea.lora.request import LoRARequest
from fovea.entrypoints.openai.streaming import (
    Cursor,
    SSEResponse,
    advance,
    holdback,
    iterate_all,
    last_outputs,
    sse,
    sse_error,
    unless_disconnected,
)
from fovea.sampling_params import SamplingParams


class CompletionServing:
    """Completions over one engine: prompt i of a batch is request `<id>-i`, its choices i*n ... i*n + n-1."""

    def __init__(self, engine: AsyncLLMEngine, tokenizer=None):
        self.engine = engine
        self.tokenizer = tokenizer  # echo: token-id prompts' text, and the names of unscored prompt tokens

    async def create(self, body: p.CompletionRequest, model: str, raw: Request,
                     lora_request: LoRARequest | None = None) -> Response:
        params = body.to_sampling_params()
        prompts = body.prompts()
        base_id = f"cmpl-{uuid.uuid4().hex}"
        ids = [base_id] if len(prompts) == 1 else [f"{base_id}-{i}" for i in range(len(prompts))]
        streams: list[RequestStream] = []
        on_close = lambda: self.engine.abort(ids)  # noqa: E731
        try:
            for request_id, prompt in zip(ids, prompts):
                streams.append(await self.engine.add_request(request_id, prompt, params, lora_request))
        except BaseException:
            on_close()
            raise
        created = int(time.time())
        if body.stream:
            return SSEResponse(completion_chunks(body, params, base_id, created, model, streams, self.tokenizer),
                               on_close)
        finals = await unless_disconnected(raw, last_outputs(streams), on_close)
        return JSONResponse(p.completion_response(body, base_id, created, model, finals, self.tokenizer).model_dump())


async def completion_chunks(body: p.CompletionRequest, params: SamplingParams, request_id: str, created: int,
                            model: str, streams: list[RequestStream], tokenizer=None) -> AsyncIterator[str]:
    def chunk(choices, usage=None) -> str:
        return sse(p.CompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=usage))

    num_held = holdback(params)
    cursors = [[Cursor() for _ in range(params.n)] for _ in streams]
    num_prompt = [0] * len(streams)
    num_completion = [0] * len(streams)
    wants_tokens = body.logprobs is not None
    echoed = [[not body.echo] * params.n for _ in streams]
    try:
        async for prompt_index, output in iterate_all(streams):
            choices = []
            for c in output.outputs:
                if not echoed[prompt_index][c.index]:  # echo: the prompt is each choice's first chunk
                    echoed[prompt_index][c.index] = True
                    logprobs = p.echo_logprobs(output.prompt_token_ids, output.prompt_logprobs, body.logprobs,
                                               lambda t: tokenizer.decode([t])) if wants_tokens else None
                    choices.append(p.CompletionChoice(index=prompt_index * params.n + c.index,
                                                      text=p.echo_text(output, tokenizer), logprobs=logprobs))
                    if logprobs is not None:  # the completion's offsets follow the prompt's, as in the whole reply
                        cursors[prompt_index][c.index].num_token_chars = sum(map(len, logprobs.tokens))
                cursor = cursors[prompt_index][c.index]
                if (step := advance(cursor, c, num_held, wants_tokens)) is None:
                    continue
                text, start = step
                logprobs = None
                if wants_tokens:
                    logprobs = p.completion_logprobs(c.token_ids[start:], c.logprobs[start:len(c.token_ids)],
                                                     body.logprobs, cursor.num_token_chars)
                    cursor.num_token_chars += sum(map(len, logprobs.tokens))
                choices.append(p.CompletionChoice(index=prompt_index * params.n + c.index, text=text,
                                                  logprobs=logprobs, finish_reason=c.finish_reason,
                                                  stop_reason=c.stop_reason))
            num_prompt[prompt_index] = len(output.prompt_token_ids)
            num_completion[prompt_index] = sum(len(c.token_ids) for c in output.outputs)
            if choices:
                yield chunk(choices)
    except (RequestAbortedError, EngineDeadError, RequestFailedError) as err:
        yield sse_error(err)
    else:
        if body.include_usage:
            yield chunk([], p.make_usage(sum(num_prompt), sum(num_completion)))
    yield "data: [DONE]\n\n"

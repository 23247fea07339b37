"""How a response follows its requests: server-sent events, the text each chunk may send, several streams
read as one, and abandoning the work when the client goes away. Shared by chat.py and completions.py."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse

from fovea.engine.async_engine import RequestStream
from fovea.entrypoints.openai import protocol as p
from fovea.entrypoints.openai.errors import APIError
from fovea.outputs import CompletionOutput, RequestOutput
from fovea.sampling_params import SamplingParams


class SSEResponse(StreamingResponse):
    """Server-sent events that run `on_close` however the response ends (also if it never starts)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            await self.body_iterator.aclose()


@dataclass(slots=True)
class Cursor:
    """How much of one choice has been sent."""

    num_chars: int = 0
    num_tokens: int = 0
    is_finished: bool = False
    # Completions' text_offset of the next token: the token strings sent so far, added up as in the whole reply
    # (not num_chars: a token that ends inside a character is "\ufffd" on its own, and its text waits).
    num_token_chars: int = 0


def holdback(params: SamplingParams) -> int:
    """Characters kept back while generating: a stop string that may still complete is cut from the final
    text, so they must not have been sent (the detokenizer's `visible_text` rule)."""
    if not params.stop or params.include_stop_str_in_output:
        return 0
    return max(map(len, params.stop)) - 1


def advance(cursor: Cursor, c: CompletionOutput, holdback: int, wants_tokens: bool) -> tuple[str, int] | None:
    """(new text, index of the first new token) to send for this choice, or None if nothing is worth a chunk."""
    if cursor.is_finished:
        return None
    is_done = c.finish_reason is not None
    end = len(c.text) if is_done else max(cursor.num_chars, len(c.text) - holdback)
    text, start = c.text[cursor.num_chars:end], cursor.num_tokens
    if not text and not is_done and not (wants_tokens and len(c.token_ids) > start):
        return None
    cursor.num_chars, cursor.num_tokens, cursor.is_finished = max(end, cursor.num_chars), len(c.token_ids), is_done
    return text, start


def sse(message: p.OpenAIModel) -> str:
    return f"data: {message.model_dump_json()}\n\n"


def sse_error(err: BaseException) -> str:
    return sse(p.ErrorResponse(error=p.ErrorInfo(message=str(err), type="server_error")))


async def iterate_all(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(index of the stream, output) from several streams as outputs arrive, until all are done."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((index, output))
            queue.put_nowait((index, done))
        except Exception as err:  # handed to the reader, which raises it
            queue.put_nowait((index, err))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        num_running = len(streams)
        while num_running:
            index, item = await queue.get()
            if item is done:
                num_running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def unless_disconnected(raw: Request, work: Awaitable, on_close: Callable[[], None]):
    """Await `work`, abandoning it if the client disconnects first; `on_close` runs in every case."""
    async def disconnected() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    work_task, watch_task = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        if work_task.done():
            return work_task.result()
        raise APIError(499, "the client closed the connection", "client_closed_request")
    finally:
        work_task.cancel()
        watch_task.cancel()
        on_close()


async def last_output(stream: RequestStream) -> RequestOutput:
    output = None
    async for output in stream:
        pass
    return output


async def last_outputs(streams: list[RequestStream]) -> list[RequestOutput]:
    finals: list[RequestOutput | None] = [None] * len(streams)
    async for index, output in iterate_all(streams):
        finals[index] = output
    return finals

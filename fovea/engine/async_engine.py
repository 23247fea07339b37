"""AsyncLLMEngine: one `LLMEngine` kept stepping while requests arrive and leave, for the server.

The engine is not thread-safe, so it has one owner: a single worker thread. Every call into it (add, abort,
step, reading stats) is a job on that thread's queue, run in order; the asyncio event loop only moves bytes
and never waits on model math, so it keeps answering `/health` and accepting requests while a step runs.

    add_request ──► engine thread: LLMEngine.add_request ──► RequestStream (one per request)
    loop task   ──► engine thread: step() ──► RequestOutput per request ──► its stream (latest output wins)
    abort       ──► engine thread: abort_request (frees KV blocks); the stream ends

Outputs are cumulative (all text and ids so far), so a stream keeps only the newest one: a slow reader skips
intermediate outputs without losing anything, and memory per request is bounded.

A request the model raised on (one of its completions finished with reason "error", see fovea.engine.core)
fails its stream with `RequestFailedError` and its other completions are aborted; the engine and every other
request go on.

A dead executor (a worker process of a multi-process engine gone: fovea.executor.ExecutorDeadError), noticed
during a step or by the executor's monitor while idle, stops the engine: every stream and every later request
fails with `EngineUnavailableError` (the server answers 503) and `dead_callbacks` run (the server exits).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from fovea.engine.input_processor import PromptType
from fovea.engine.structured_output import CONSTRAINT_ERROR_PREFIX
from fovea.engine.llm_engine import LLMEngine
from fovea.executor import ExecutorDeadError
from fovea.lora.request import LoRARequest
from fovea.outputs import RequestOutput
from fovea.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full (`max_waiting_requests`); the server answers 503."""


class EngineDeadError(RuntimeError):
    """A step raised; the engine state cannot be trusted any more and no request is accepted."""


class EngineUnavailableError(EngineDeadError):
    """The engine's executor died (a worker process gone); the server answers 503 and exits."""


class RequestFailedError(RuntimeError):
    """The model raised on this request alone (the other requests of its steps were answered); the server
    answers 500."""


class ConstraintLimitError(RequestFailedError):
    """The request's structured-outputs grammar reached one of its limits while generating (the client's
    constraint, not the model, is at fault: the server answers 400 naming the limit)."""


class RequestAbortedError(RuntimeError):
    """The request was aborted (by `abort`, or at shutdown) while someone was still reading its stream."""


@dataclass(slots=True, frozen=True)
class EngineStats:
    """A snapshot taken on the engine thread after every job; safe to read from any thread."""

    num_running: int = 0
    num_waiting: int = 0
    num_unfinished: int = 0  # requests (a request with n > 1 is one), as LLMEngine counts them
    num_batches_in_flight: int = 0  # pipeline micro-batches dispatched and not landed (may hold aborted requests)
    num_preemptions: int = 0  # since start
    num_kv_blocks_used: int = 0
    num_kv_blocks_total: int = 0  # usable blocks (the reserved null block excluded)
    prefix_cache_queries: int = 0  # prompt tokens looked up, since start
    prefix_cache_hits: int = 0
    encoder_cache_queries: int | None = None  # multimodal items looked up, since start (None: not counted)
    encoder_cache_hits: int | None = None
    num_encoder_cache_tokens_used: int = 0  # encoder outputs referenced by requests, in encoder tokens
    num_encoder_cache_tokens_total: int = 0  # the encoder cache's size, in encoder tokens
    encoder_cache_bytes: int = 0  # tensors the runner holds (freed ones go at its next step)
    num_suspects: int = 0  # sequences being retried alone after a failed step
    num_failed_steps: int = 0  # steps whose model run raised, since start
    num_aborted_requests: int = 0  # ended by `abort` before they finished (client gone, shutdown), since start


@dataclass(slots=True)
class IterationStats:
    """What one step produced, for the metrics: token counts and latencies observed this step."""

    num_prompt_tokens: int = 0  # of requests that got their first token this step
    num_generation_tokens: int = 0
    time_to_first_token_s: list[float] = field(default_factory=list)
    time_per_output_token_s: list[float] = field(default_factory=list)  # one per token after the first
    num_finished: int = 0
    num_failed: int = 0  # requests the model raised on (RequestFailedError)


class StatLogger(Protocol):
    def record(self, iteration: IterationStats) -> None: ...


class RequestStream:
    """The outputs of one request, newest first-come: `async for output in stream` until it is finished."""

    def __init__(self, request_id: str, arrival_time: float):
        self.request_id = request_id
        self.arrival_time = arrival_time
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.num_generation_tokens = 0  # over all n completions
        self.num_token_steps = 0  # tokens of the longest completion
        self._latest: RequestOutput | None = None
        self._error: BaseException | None = None
        self._is_done = False  # no output will come after `_latest`
        self._event = asyncio.Event()

    def put(self, output: RequestOutput) -> None:
        self._latest = output
        self._is_done = output.finished
        self._event.set()

    def fail(self, error: BaseException) -> None:
        self._error, self._is_done = error, True
        self._event.set()

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._outputs()

    async def _outputs(self) -> AsyncIterator[RequestOutput]:
        while True:
            await self._event.wait()
            self._event.clear()
            output, self._latest = self._latest, None
            if output is not None:
                yield output
            if self._error is not None:
                raise self._error
            if self._is_done and self._latest is None:
                return


def _settle(future: asyncio.Future, setter, value) -> None:
    if not future.done():  # the caller may have gone (cancelled)
        setter(value)


class AsyncLLMEngine:
    """Drive `engine` from an asyncio program. Call `start()` inside the running loop, `shutdown()` at the end.

    `max_waiting_requests`: refuse a new request (EngineOverloadedError) while the scheduler's waiting queue
    (sequences not yet admitted, preempted ones included) already holds this many; None means no limit.
    """

    def __init__(self, engine: LLMEngine, *, max_waiting_requests: int | None = None,
                 stat_loggers: list[StatLogger] | None = None):
        if max_waiting_requests is not None and max_waiting_requests < 0:
            raise ValueError(f"max_waiting_requests must be >= 0 or None, got {max_waiting_requests}")
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.stat_loggers = list(stat_loggers or [])
        self.stats = EngineStats()
        self.num_aborted_requests = 0  # ended by `abort` before they finished (client gone, shutdown), since start
        self.dead_error: BaseException | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fovea-engine")
        self._streams: dict[str, RequestStream] = {}
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._is_stopping = False
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self.dead_callbacks: list = []  # called on the event loop with the error when the executor dies
        on_failure = getattr(engine.engine_core.executor, "on_failure", None)
        if on_failure is not None:
            on_failure(self._executor_failed)
        self._embed_calls: collections.deque = collections.deque()  # (inputs, pooling, future) waiting to run

    # ---- lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._loop_task is not None:
            raise RuntimeError("the engine loop is already running")
        self.stats = self._snapshot()  # nothing runs on the engine thread yet
        self._wakeup = asyncio.Event()
        self._event_loop = asyncio.get_running_loop()
        self._loop_task = self._event_loop.create_task(self._run_loop(), name="fovea-engine-loop")

    async def shutdown(self, timeout_s: float | None = None) -> None:
        """Stop taking requests, let the running ones finish (at most `timeout_s`, then abort them), stop."""
        self._is_stopping = True
        if self._loop_task is not None:
            self._wakeup.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._loop_task), timeout_s)
            except asyncio.TimeoutError:
                logger.warning("shutdown: aborting %d unfinished request(s) after %.1f s", len(self._streams),
                               timeout_s)
                self.abort(list(self._streams))
                self._wakeup.set()
                await self._loop_task
        self._executor.shutdown(wait=True)
        self.engine.engine_core.shutdown()  # worker processes, if any, exit now

    def stop_soon(self, timeout_s: float) -> None:
        """Callable from any thread or a signal handler (SIGTERM): refuse new requests from now on, and abort
        the ones still running after `timeout_s`, so that each ends with an error its client can read (an
        error event in its stream, or a 503) before the server closes connections."""
        loop = self._event_loop
        if loop is None or loop.is_closed():
            return

        def begin() -> None:
            self._is_stopping = True
            self._wakeup.set()
            loop.call_later(timeout_s, lambda: self.abort(list(self._streams)))

        loop.call_soon_threadsafe(begin)

    @property
    def is_running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done() and self.dead_error is None

    # ---- requests -----------------------------------------------------------------------------------------------

    async def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                          lora_request: LoRARequest | None = None) -> RequestStream:
        """Validate and queue a request. Raises ValueError (bad request), EngineOverloadedError (queue full),
        EngineDeadError, or RuntimeError when shutting down. The caller must `abort` the request if it stops
        reading before the stream is done (abort of a finished request is a no-op)."""
        if self.dead_error is not None:
            raise self._dead_error_for_requests()
        if self._is_stopping or self._loop_task is None:
            # a RuntimeError the server answers with 503, as any request cut short by shutdown
            raise RequestAbortedError("the engine is not accepting requests (not started, or shutting down)")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params is not None and getattr(params, "structured_outputs", None) is not None:
            # compiled here, on a worker thread, not on the engine thread between two steps: a grammar can take
            # up to its limits' worth of time, which the running requests must not wait for (the engine's own
            # check at add_request then finds it cached)
            # (the compiler itself is made on the engine thread: making it tells the executor's workers)
            compiler = await self._call(self.engine.grammar_compiler)
            await asyncio.to_thread(compiler.compile, params.structured_outputs)
        stream = RequestStream(request_id, time.monotonic())
        self._streams[request_id] = stream  # before the job runs: the first step may already have its output
        try:
            await self._call(self._add_now, request_id, prompt, params, lora_request)
        except BaseException as err:
            self._streams.pop(request_id, None)
            if isinstance(err, asyncio.CancelledError):  # the add job may still run: withdraw it right after
                self._executor.submit(self._job, self.engine.abort_request, ([request_id],))
            raise
        self._wakeup.set()
        return stream

    def abort(self, request_ids: str | list[str]) -> None:
        """End these requests and free their KV blocks. Callable from the event loop without awaiting; ids that
        already finished (or never existed) are ignored."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        streams = [s for i in ids if (s := self._streams.pop(i, None)) is not None]
        if not streams:
            return
        self.num_aborted_requests += len(streams)
        for stream in streams:
            stream.fail(RequestAbortedError(f"request {stream.request_id!r} was aborted"))
        try:
            self._executor.submit(self._job, self.engine.abort_request, ([s.request_id for s in streams],))
        except RuntimeError:  # the executor is gone: the process is exiting
            return
        if self._wakeup is not None:
            self._wakeup.set()

    async def embed(self, inputs: list, pooling: str | None = None) -> list:
        """`LLMEngine.embed` on the engine thread, between two steps (the model is never run from two threads).
        Calls that arrive while the engine thread is busy wait together and run as one batch
        (`LLMEngine.embed_many`): a bad call gets its own ValueError, the others their embeddings."""
        future = asyncio.get_running_loop().create_future()
        self._embed_calls.append((inputs, pooling, future))
        # every call submits a drain; the first to run takes all that are waiting, the later ones find none
        await asyncio.wrap_future(self._executor.submit(self._job, self._embed_waiting, ()))
        return await future

    def _embed_waiting(self) -> None:
        calls = []
        while self._embed_calls:
            calls.append(self._embed_calls.popleft())
        if not calls:
            return
        try:
            results = self.engine.embed_many([(inputs, pooling) for inputs, pooling, _ in calls])
        except BaseException as err:  # the model raised: every call of the batch gets the error
            results = [err] * len(calls)
        for (_, _, future), result in zip(calls, results):
            setter = future.set_exception if isinstance(result, BaseException) else future.set_result
            future.get_loop().call_soon_threadsafe(_settle, future, setter, result)

    async def get_stats(self) -> EngineStats:
        """Stats after every job queued so far has run (the snapshot in `stats` may be one job old)."""
        return await self._call(self._snapshot)

    # ---- the loop -------------------------------------------------------------------------------------------------

    async def _run_loop(self) -> None:
        while True:
            if self.dead_error is not None:
                return
            # a batch in flight may hold only aborted requests: it is stepped until it lands, so that their KV
            # blocks are freed now and not at the next request's arrival (which may never come)
            if self.stats.num_unfinished == 0 and self.stats.num_batches_in_flight == 0:
                if self._is_stopping:
                    return
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            try:
                outputs = await self._call(self.engine.step)
            except Exception as err:  # a bug, a broken model or a dead worker: fail every request, refuse new ones
                logger.exception("engine step failed; the engine stops")
                self._die(err)
                return
            if self.dead_error is not None:  # the executor died while this step's outputs were on their way
                return
            self._dispatch(outputs, time.monotonic())

    def _die(self, err: BaseException) -> None:
        if self.dead_error is not None:
            return
        self.dead_error = err
        for stream in self._streams.values():
            stream.fail(self._dead_error_for_requests())
        self._streams.clear()
        if isinstance(err, ExecutorDeadError):
            for callback in self.dead_callbacks:
                callback(err)

    def _dead_error_for_requests(self) -> EngineDeadError:
        err = self.dead_error
        if isinstance(err, ExecutorDeadError):
            return EngineUnavailableError(f"the engine is unavailable: {err}")
        return EngineDeadError(f"the engine stopped after an error: {err!r}")

    def _executor_failed(self, err: ExecutorDeadError) -> None:
        """From the executor's monitor thread: a worker died, possibly while no step runs."""
        loop = self._event_loop
        if loop is None or loop.is_closed():
            self.dead_error = self.dead_error or err
            return

        def die() -> None:
            self._die(err)
            if self._wakeup is not None:
                self._wakeup.set()

        loop.call_soon_threadsafe(die)

    def _dispatch(self, outputs: list[RequestOutput], now: float) -> None:
        iteration = IterationStats()
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:  # aborted while the step ran
                continue
            # children of an n > 1 request decode in lockstep: latencies follow the longest, counts add up
            num_tokens = sum(len(c.token_ids) for c in output.outputs)
            num_steps = max(len(c.token_ids) for c in output.outputs)
            if num_tokens > stream.num_generation_tokens:
                num_later = num_steps - stream.num_token_steps
                if stream.first_token_time is None:
                    stream.first_token_time = now
                    iteration.time_to_first_token_s.append(now - stream.arrival_time)
                    iteration.num_prompt_tokens += len(output.prompt_token_ids or ())
                    num_later -= 1
                if num_later > 0:
                    per_token = (now - stream.last_token_time) / num_later if stream.last_token_time else 0.0
                    iteration.time_per_output_token_s.extend([per_token] * num_later)
                stream.last_token_time = now
                iteration.num_generation_tokens += num_tokens - stream.num_generation_tokens
                stream.num_generation_tokens, stream.num_token_steps = num_tokens, num_steps
            errors = [c.stop_reason for c in output.outputs if c.finish_reason == "error"]
            if errors:  # the model raised on it: fail the stream, withdraw its other completions
                del self._streams[output.request_id]
                if str(errors[0]).startswith(CONSTRAINT_ERROR_PREFIX):
                    stream.fail(ConstraintLimitError(f"request {output.request_id!r}: {errors[0]}"))
                else:
                    stream.fail(RequestFailedError(f"the model failed on request {output.request_id!r}: {errors[0]}"))
                if not output.finished:
                    self._executor.submit(self._job, self.engine.abort_request, ([output.request_id],))
                iteration.num_failed += 1
                continue
            stream.put(output)
            if output.finished:
                del self._streams[output.request_id]
                iteration.num_finished += 1
        for stat_logger in self.stat_loggers:
            stat_logger.record(iteration)

    # ---- jobs on the engine thread ------------------------------------------------------------------------------

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._job, fn, args)

    def _job(self, fn, args):
        try:
            return fn(*args)
        finally:
            self.stats = self._snapshot()

    def _add_now(self, request_id: str, prompt: PromptType, params: SamplingParams,
                 lora_request: LoRARequest | None = None) -> None:
        limit = self.max_waiting_requests
        if limit is not None and self.engine.scheduler.num_waiting >= limit:
            raise EngineOverloadedError(
                f"the server is overloaded: {self.engine.scheduler.num_waiting} sequences are waiting "
                f"(--max-waiting-requests={limit}); retry later")
        self.engine.add_request(request_id, prompt, params, lora_request=lora_request)

    def _snapshot(self) -> EngineStats:
        scheduler = self.engine.scheduler
        kv = scheduler.kv_cache_manager
        encoder = scheduler.encoder_cache_manager
        return EngineStats(
            num_running=scheduler.num_running,
            num_waiting=scheduler.num_waiting,
            num_unfinished=self.engine.get_num_unfinished_requests(),
            num_batches_in_flight=self.engine.engine_core.num_batches_in_flight,
            num_preemptions=scheduler.num_preemptions,
            num_kv_blocks_used=kv.num_usable_blocks - kv.num_free_blocks,
            num_kv_blocks_total=kv.num_usable_blocks,
            prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits,
            encoder_cache_queries=getattr(encoder, "num_queries", None),
            encoder_cache_hits=getattr(encoder, "num_hits", None),
            num_encoder_cache_tokens_used=encoder.cache_size - encoder.num_free_slots,
            num_encoder_cache_tokens_total=encoder.cache_size,
            encoder_cache_bytes=self.engine.engine_core.executor.encoder_cache_bytes(),
            num_suspects=len(scheduler.suspects),
            num_failed_steps=scheduler.num_failed_steps,
            num_aborted_requests=self.num_aborted_requests,
        )

"""Prometheus metrics of the server (`GET /metrics`), named like vLLM's with a `fovea:` prefix.

Two sources. The engine's state (requests running and waiting, KV blocks, and its own running totals:
preemptions, prefix- and encoder-cache lookups) is read from `AsyncLLMEngine.stats` at scrape time by a
collector, so it is never stale or double-counted. What happens per step (tokens, latencies) comes from the
engine loop's `IterationStats` through `record`. Every response that is not 2xx is counted by status code by
`ErrorCountingMiddleware` (an error event inside a started stream is not a response status: the stream is a
200). The process's own figures (resident memory, CPU, open files) are prometheus_client's standard
`process_*` metrics.
"""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fovea.engine.async_engine import EngineStats, IterationStats
from fovea.entrypoints.media_errors import MediaRefusals

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. CPU serving spans milliseconds (tiny models) to seconds (a long prefill behind a queue).
_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class _EngineCollector(Collector):
    def __init__(self, read_stats, model_name: str):
        self._read_stats = read_stats
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        stats: EngineStats = self._read_stats()
        labels, values = ["model_name"], [self._model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric(values, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric(values, value)
            return family

        yield gauge("fovea:num_requests_running", "Sequences in the running batch.", stats.num_running)
        yield gauge("fovea:num_requests_waiting", "Sequences waiting to be admitted (preempted ones included).",
                    stats.num_waiting)
        yield gauge("fovea:kv_cache_blocks_used", "KV cache blocks held by requests.", stats.num_kv_blocks_used)
        yield gauge("fovea:kv_cache_blocks_total", "Usable KV cache blocks.", stats.num_kv_blocks_total)
        yield gauge("fovea:kv_cache_usage_perc", "Fraction of usable KV cache blocks in use (1 = full).",
                    stats.num_kv_blocks_used / max(1, stats.num_kv_blocks_total))
        yield counter("fovea:num_preemptions", "Preemptions (recompute) since start.", stats.num_preemptions)
        yield counter("fovea:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      stats.prefix_cache_queries)
        yield counter("fovea:prefix_cache_hits", "Prompt tokens served from the prefix cache.",
                      stats.prefix_cache_hits)
        yield gauge("fovea:encoder_cache_tokens_used", "Encoder outputs held for requests, in encoder tokens.",
                    stats.num_encoder_cache_tokens_used)
        yield gauge("fovea:encoder_cache_tokens_total", "The encoder cache's size, in encoder tokens.",
                    stats.num_encoder_cache_tokens_total)
        yield gauge("fovea:encoder_cache_bytes", "Encoder output tensors the model runner holds.",
                    stats.encoder_cache_bytes)
        yield gauge("fovea:num_requests_suspect", "Sequences retried one at a time after a failed step.",
                    stats.num_suspects)
        yield counter("fovea:failed_steps", "Steps whose model run raised (each fails or retries its requests).",
                      stats.num_failed_steps)
        yield counter("fovea_requests_aborted", "Requests aborted before they finished: client disconnects, "
                      "cancellations, shutdown.", stats.num_aborted_requests)
        if stats.encoder_cache_queries is not None:
            yield counter("fovea:encoder_cache_queries", "Multimodal items looked up in the encoder cache.",
                          stats.encoder_cache_queries)
        if stats.encoder_cache_hits is not None:
            yield counter("fovea:encoder_cache_hits", "Multimodal items whose encoder output was already cached.",
                          stats.encoder_cache_hits)


class _MediaRefusalCollector(Collector):
    """`fovea_media_refused_total{reason}` (named as the other per-cause counters: fovea_request_errors_total
    {status}, fovea_requests_aborted_total): client media the server refused, by `media_errors.REASONS` (every
    reason listed from the start, at 0), read from the fetcher's running counts at scrape time."""

    def __init__(self, refusals: MediaRefusals):
        self._refusals = refusals

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("fovea_media_refused", "Client media refused, by reason.", labels=["reason"])
        for reason, count in self._refusals:
            family.add_metric([reason], count)
        yield family


class ServerMetrics:
    """One per app, on its own registry (so several apps in one process do not collide)."""

    def __init__(self, model_name: str, read_stats, media_refusals: MediaRefusals | None = None):
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}
        self.registry.register(_EngineCollector(read_stats, model_name))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes and friends (Linux /proc)
        self.request_errors = Counter("fovea_request_errors", "Responses with a status other than 2xx.",
                                      ["model_name", "status"], registry=self.registry)
        if media_refusals is not None:
            self.registry.register(_MediaRefusalCollector(media_refusals))
        self.prompt_tokens = Counter("fovea:prompt_tokens", "Prompt tokens processed (counted at first token).",
                                     ["model_name"], registry=self.registry).labels(**labels)
        self.generation_tokens = Counter("fovea:generation_tokens", "Tokens generated.", ["model_name"],
                                         registry=self.registry).labels(**labels)
        self.requests_finished = Counter("fovea:request_success", "Requests that finished.", ["model_name"],
                                         registry=self.registry).labels(**labels)
        self.time_to_first_token = Histogram(
            "fovea:time_to_first_token_seconds", "From arrival to the first generated token.", ["model_name"],
            buckets=_TTFT_BUCKETS, registry=self.registry).labels(**labels)
        self.time_per_output_token = Histogram(
            "fovea:time_per_output_token_seconds", "Between consecutive generated tokens of a request.",
            ["model_name"], buckets=_TPOT_BUCKETS, registry=self.registry).labels(**labels)

    def record(self, iteration: IterationStats) -> None:
        """The engine loop's StatLogger hook, called once per step on the event loop."""
        self.prompt_tokens.inc(iteration.num_prompt_tokens)
        self.generation_tokens.inc(iteration.num_generation_tokens)
        self.requests_finished.inc(iteration.num_finished)
        for seconds in iteration.time_to_first_token_s:
            self.time_to_first_token.observe(seconds)
        for seconds in iteration.time_per_output_token_s:
            self.time_per_output_token.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ErrorCountingMiddleware:
    """ASGI middleware: counts every HTTP response whose status is not 2xx in `fovea_request_errors_total`,
    by status; an exception that escapes every handler is counted as the 500 the server then sends."""

    def __init__(self, app, metrics: ServerMetrics, model_name: str):
        self.app, self.metrics, self.model_name = app, metrics, model_name

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_counted(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self._count(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception:
            if not started:
                self._count(500)
            raise

    def _count(self, status: int) -> None:
        if not 200 <= status < 300:
            self.metrics.request_errors.labels(model_name=self.model_name, status=str(status)).inc()

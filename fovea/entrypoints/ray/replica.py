"""An engine replica: one fovea engine and the single-process server's OpenAI app (`build_app`) in one Ray Serve
replica. The ingress hands it whole HTTP requests (`ForwardedRequest`); the replica runs each through the app
in-process (ASGI) and streams the response back: a `ResponseStart`, then the body's chunks as the app sends
them (so server-sent events stay streamed). Everything the app does (API key, media limits and address rules,
validation, errors, /metrics) is therefore exactly the single-process server's.

A response names its replica in the `x-fovea-replica` header. The app's metrics registry is also served on a
port of the replica's own and listed in the application's directory (replica_metrics.py).

When the caller goes away (the HTTP client disconnected, so the ingress cancelled the call) the app sees
`http.disconnect`, as under uvicorn, and aborts the request.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os

import ray
from prometheus_client import start_http_server
from ray import serve

from fovea.config import EngineConfig
from fovea.engine.async_engine import AsyncLLMEngine
from fovea.engine.llm_engine import LLMEngine
from fovea.entrypoints.openai.app import build_app
from fovea.entrypoints.ray.replica_metrics import metrics_directory
from fovea.entrypoints.ray.routing import ForwardedRequest, ResponseStart

logger = logging.getLogger("fovea.ray")

REPLICA_HEADER = b"x-fovea-replica"
_APP_EXIT_GRACE_S = 10.0  # after a disconnect: time for the app to abort the request and return


@serve.deployment
class EngineReplica:
    def __init__(self, model: str, engine_options: dict, server_options, app_name: str):
        config = EngineConfig.from_kwargs(model, **engine_options)
        settings = server_options.to_settings()
        self.engine = AsyncLLMEngine(LLMEngine(config), max_waiting_requests=settings.max_waiting_requests)
        self.app = build_app(self.engine, settings)
        self.shutdown_timeout_s = settings.shutdown_timeout_s
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._lifespan = self.app.router.lifespan_context(self.app)
        self._started: asyncio.Task | None = None
        host = _node_address()
        self._metrics_server, _ = start_http_server(0, addr=host, registry=self.app.state.metrics.registry)
        self._directory = metrics_directory(app_name)
        url = f"http://{host}:{self._metrics_server.server_port}/metrics"
        ray.get(self._directory.register.remote(self.replica_id, url, os.getpid()))
        logger.info("fovea replica %s: engine loaded; metrics at %s", self.replica_id, url)

    async def _start(self) -> None:
        # the app's lifespan (which starts the engine loop) must run on the replica's event loop: on first use
        if self._started is None:
            self._started = asyncio.ensure_future(self._lifespan.__aenter__())
        await asyncio.shield(self._started)

    async def check_health(self) -> None:
        """Serve's periodic health check: a dead engine loop makes Serve replace the replica."""
        if self._started is not None and self._started.done() and not self.engine.is_running:
            raise RuntimeError(f"the engine of replica {self.replica_id} is not running: {self.engine.dead_error}")

    async def forward(self, request: ForwardedRequest):
        """Run one HTTP request through the app; yields a ResponseStart, then body chunks (bytes)."""
        await self._start()
        messages: asyncio.Queue = asyncio.Queue()
        disconnected = asyncio.Event()
        body_sent = False

        async def receive() -> dict:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
                 "scheme": "http", "path": request.path, "raw_path": request.path.encode(), "root_path": "",
                 "query_string": request.query_string, "headers": request.headers, "client": request.client,
                 "server": None}
        app_task = asyncio.ensure_future(self.app(scope, receive, messages.put))
        try:
            while True:
                if messages.empty() and app_task.done():
                    app_task.result()  # the app returned without finishing its response: its error, if any
                    raise RuntimeError(f"the app ended {request.method} {request.path} without a complete response")
                next_message = asyncio.ensure_future(messages.get())
                await asyncio.wait({next_message, app_task}, return_when=asyncio.FIRST_COMPLETED)
                if not next_message.done():
                    next_message.cancel()
                    continue
                message = next_message.result()
                if message["type"] == "http.response.start":
                    yield ResponseStart(message["status"], [*message.get("headers", []),
                                                            (REPLICA_HEADER, self.replica_id.encode())])
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body", False):
                        return
        finally:
            disconnected.set()
            with contextlib.suppress(BaseException):  # the app's own errors are logged by the app
                await asyncio.wait_for(app_task, _APP_EXIT_GRACE_S)

    async def __del__(self) -> None:
        """Serve's graceful shutdown: finish (or, after --shutdown-timeout-s, abort) what runs, stop the engine."""
        with contextlib.suppress(Exception):
            self._directory.unregister.remote(self.replica_id)
        self._metrics_server.shutdown()
        if self._started is not None:
            await self._lifespan.__aexit__(None, None, None)


def _node_address() -> str:
    """The address this replica's node joined the cluster with (loopback on a local `ray.init(_node_ip_address=
    "127.0.0.1")`), where the cluster's members reach each other."""
    node_id = ray.get_runtime_context().get_node_id()
    return next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)

"""The HTTP ingress of a fovea Ray Serve application: every request on the endpoint arrives here (from Serve's
proxy), is read once, and goes to an engine replica through a deployment handle (so the prefix-affinity
router sees its prefix: routing.py); the replica's streamed response is passed on as it comes.

A replica that dies (its process killed, its node lost) is a `RayActorError` here:
  - before the response has started (a non-streamed request is answered only when generation ends, so this
    covers all of those), the request is sent again, to another replica, up to `max_attempts` times in all;
    when every attempt fails the answer is a 503 naming the cause, in OpenAI's error shape;
  - after a stream has started, the stream ends with an error event naming the cause, then `data: [DONE]`,
    as when the single-process server's engine fails mid-stream (what was sent cannot be taken back).
Serve replaces the dead replica meanwhile. A client that disconnects cancels the call, and the replica aborts
the request.

`GET /metrics` is the union of every replica's metrics (replica_metrics.py), `GET /metrics/replicas` lists
the live replicas' own metrics URLs; everything else is the replicas' (the single-process server's routes).
"""
from __future__ import annotations

import asyncio
import json
import logging

from ray import serve
from ray.exceptions import RayActorError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from fovea.entrypoints.openai.errors import error_response
from fovea.entrypoints.openai.metrics import CONTENT_TYPE
from fovea.entrypoints.ray.replica_metrics import live_replica_urls, merged_metrics
from fovea.entrypoints.ray.routing import ForwardedRequest, ResponseStart, routing_prefix

logger = logging.getLogger("fovea.ray")

_RETRY_BACKOFF_S = 0.5


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Ingress:
    def __init__(self, engine, app_name: str, max_attempts: int):
        self.engine = engine.options(stream=True)
        self.app_name = app_name
        self.max_attempts = max_attempts
        self.num_retried = 0  # requests sent again after a replica died (logged)

    async def __call__(self, request: Request) -> Response:
        path = request.scope["path"]
        if request.method == "GET" and path == "/metrics":
            return Response(await merged_metrics(self.app_name), media_type=CONTENT_TYPE)
        if request.method == "GET" and path == "/metrics/replicas":
            return JSONResponse(await live_replica_urls(self.app_name))
        body = await request.body()
        client = request.client
        forwarded = ForwardedRequest(
            method=request.method, path=path, query_string=request.scope.get("query_string", b""),
            headers=list(request.scope["headers"]), body=body, prefix=routing_prefix(path, body),
            client=(client.host, client.port) if client else None)
        failures = []
        for attempt in range(1, self.max_attempts + 1):
            chunks = self.engine.forward.remote(forwarded)
            try:
                start = await chunks.__anext__()
            except RayActorError as err:
                failures.append(_cause(err))
                if attempt < self.max_attempts:
                    self.num_retried += 1
                    logger.warning("%s %s: its replica died before answering (%s); sending it again (attempt %d "
                                   "of %d)", request.method, path, failures[-1], attempt + 1, self.max_attempts)
                    await asyncio.sleep(_RETRY_BACKOFF_S)
                continue
            assert isinstance(start, ResponseStart), f"a replica answered {type(start).__name__} first"
            response = StreamingResponse(self._relay(chunks, start), status_code=start.status)
            response.raw_headers = list(start.headers)
            if attempt > 1:
                response.raw_headers.append((b"x-fovea-attempts", str(attempt).encode()))
            return response
        return error_response(503, f"the engine replica serving this request died before answering, on each of "
                                   f"{self.max_attempts} attempts ({'; '.join(failures)}); Serve is replacing it: "
                                   f"retry later", "server_error", code="replica_died")

    async def _relay(self, chunks, start: ResponseStart):
        is_stream = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                        for k, v in start.headers)
        try:
            async for chunk in chunks:
                yield chunk
        except RayActorError as err:
            logger.warning("a replica died mid-response: %s", _cause(err))
            if is_stream:
                error = {"error": {"message": f"the engine replica serving this stream died: {_cause(err)}",
                                   "type": "server_error", "param": None, "code": "replica_died"}}
                yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
        finally:
            chunks.cancel()  # a no-op when it finished; else (client gone) the replica aborts the request


def _cause(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]

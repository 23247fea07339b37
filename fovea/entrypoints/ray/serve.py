"""The OpenAI server as a Ray Serve application: K engine replicas behind one HTTP endpoint.

    fovea serve MODEL --num-replicas 2                      # a local Ray instance, or the cluster in $RAY_ADDRESS
    fovea serve MODEL --min-replicas 1 --max-replicas 4 --target-ongoing-requests 8     # autoscaling

    import ray
    from fovea.entrypoints.ray.serve import ServeOptions, deploy, shutdown
    ray.init(address="ray://head:10001")                    # an existing cluster
    deploy("path/to/model", num_replicas=2, port=8000, server=ServeOptions(api_key="..."), dtype="bfloat16")
    ...
    shutdown()                                               # the application, its replicas and its directory

The application has two deployments: `Ingress` (ingress.py, no CPU of its own) receives every HTTP request
and hands it to an `EngineReplica` (replica.py: one engine + the single-process server's app) chosen by the
prefix-affinity router (routing.py). A replica is an ordinary fovea engine built from the same options as
`LLM(...)` / `fovea serve`, so the server's safety options (API key, media limits, allowed addresses) are the
single-process server's, applied in each replica.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fovea.entrypoints.media_config import MediaConfig
from fovea.entrypoints.ray._require import require_ray
from fovea.lora.request import LoRARequest

DEFAULT_APP_NAME = "fovea"


@dataclass(slots=True, frozen=True)
class ServeOptions:
    """The single-process server's `ServerSettings` in a form that travels to replicas (its media fetcher is
    built in each replica from `media`)."""

    served_model_names: tuple[str, ...] = ()
    api_key: str | None = None
    max_waiting_requests: int | None = None
    chat_template: str | None = None
    media: MediaConfig = field(default_factory=MediaConfig)
    shutdown_timeout_s: float | None = None
    lora_modules: tuple[LoRARequest, ...] = ()

    def to_settings(self):
        from fovea.entrypoints.media_fetch import MediaFetcher
        from fovea.entrypoints.openai.app import ServerSettings

        return ServerSettings(served_model_names=list(self.served_model_names), api_key=self.api_key,
                              max_waiting_requests=self.max_waiting_requests, chat_template=self.chat_template,
                              fetcher=MediaFetcher(self.media), shutdown_timeout_s=self.shutdown_timeout_s,
                              lora_modules=list(self.lora_modules))


@dataclass(slots=True, frozen=True)
class ReplicaScaling:
    """How many engine replicas: a fixed `num_replicas`, or Serve's autoscaling between `min_replicas` and
    `max_replicas` (starting at `num_replicas`) aiming at `target_ongoing_requests` per replica."""

    num_replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None

    @property
    def is_autoscaling(self) -> bool:
        return any(v is not None for v in (self.min_replicas, self.max_replicas, self.target_ongoing_requests))

    def deployment_options(self) -> dict[str, Any]:
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas}")
        if not self.is_autoscaling:
            return {"num_replicas": self.num_replicas}
        low = 1 if self.min_replicas is None else self.min_replicas
        high = max(low, self.num_replicas) if self.max_replicas is None else self.max_replicas
        if not 0 <= low <= high or high < 1:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1; got min_replicas="
                             f"{self.min_replicas}, max_replicas={self.max_replicas}")
        config: dict[str, Any] = {"min_replicas": low, "max_replicas": high,
                                  "initial_replicas": min(max(self.num_replicas, low), high)}
        if self.target_ongoing_requests is not None:
            if not self.target_ongoing_requests > 0:
                raise ValueError(f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests}")
            config["target_ongoing_requests"] = self.target_ongoing_requests
        return {"autoscaling_config": config}


def deploy(
    model: str,
    *,
    name: str = DEFAULT_APP_NAME,
    scaling: ReplicaScaling | None = None,
    server: ServeOptions | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    route_prefix: str = "/",
    replica_num_cpus: float = 1.0,
    max_ongoing_requests: int = 64,
    max_attempts: int = 3,
    prefix_imbalance_threshold: int = 8,
    **engine_options: Any,
):
    """Deploy MODEL's OpenAI server on the Ray cluster this process is connected to (`ray.init(...)` first; a
    local instance is started if none is) and return once every replica is ready; returns the ingress's
    DeploymentHandle. The HTTP endpoint is `http://host:port{route_prefix}` (Serve's proxy; `host`/`port` take
    effect when this call starts Serve on the cluster).

    Each replica asks Ray for `replica_num_cpus` CPUs and runs its engine with that many threads unless
    `num_threads` is given; it takes up to `max_ongoing_requests` requests at once (the engine batches them).
    A request whose replica dies before answering is tried `max_attempts` times in all. Every other keyword
    is an `EngineConfig` field, checked here before anything is deployed.
    """
    require_ray("fovea.entrypoints.ray.serve.deploy", "ray.serve")
    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from fovea.config import EngineConfig
    from fovea.engine.retrieval import is_retrieval_checkpoint
    from fovea.entrypoints.ray.ingress import Ingress
    from fovea.entrypoints.ray.replica import EngineReplica
    from fovea.entrypoints.ray.routing import PrefixAffinityRouter

    scaling = scaling or ReplicaScaling()
    server = server or ServeOptions()
    if not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {model!r} (a directory with config.json)")
    if is_retrieval_checkpoint(model):
        raise ValueError("a stage-1 export (embeddings and scores only) is served by `fovea serve` without Ray "
                         "replicas; Ray Serve deploys generation models")
    if max_attempts < 1 or max_ongoing_requests < 1 or not replica_num_cpus > 0:
        raise ValueError(f"max_attempts and max_ongoing_requests must be >= 1 and replica_num_cpus > 0; got "
                         f"{max_attempts}, {max_ongoing_requests}, {replica_num_cpus}")
    engine_options = dict(engine_options)
    engine_options.setdefault("num_threads", max(1, int(replica_num_cpus)))
    if server.lora_modules:
        engine_options["enable_lora"] = True
    EngineConfig.from_kwargs(model, **engine_options)  # bad options fail here, naming the valid ones
    deployment_options = scaling.deployment_options()

    if not ray.is_initialized():
        ray.init()
    serve.start(http_options={"host": host, "port": port})
    engine = EngineReplica.options(
        ray_actor_options={"num_cpus": replica_num_cpus}, max_ongoing_requests=max_ongoing_requests,
        request_router_config=RequestRouterConfig(
            request_router_class=PrefixAffinityRouter,
            request_router_kwargs={"imbalance_threshold": prefix_imbalance_threshold}),
        **deployment_options,
    ).bind(str(Path(model).resolve()), engine_options, server, name)
    # the ingress holds every open request (they wait in it for a replica): no limit of its own
    ingress = Ingress.options(max_ongoing_requests=1_000_000).bind(engine, name, max_attempts)
    return serve.run(ingress, name=name, route_prefix=route_prefix)


def shutdown(name: str = DEFAULT_APP_NAME) -> None:
    """Delete the application (its replicas finish or abort their requests, see --shutdown-timeout-s) and its
    metrics directory."""
    require_ray("fovea.entrypoints.ray.serve.shutdown", "ray.serve")
    import ray
    from ray import serve

    from fovea.entrypoints.ray.replica_metrics import NAMESPACE, directory_name

    serve.delete(name)
    try:
        ray.kill(ray.get_actor(directory_name(name), namespace=NAMESPACE))
    except ValueError:  # no directory: no replica ever started
        pass


def replica_metrics_urls(name: str = DEFAULT_APP_NAME) -> dict[str, str]:
    """Each live replica's own metrics URL, by replica id."""
    require_ray("fovea.entrypoints.ray.serve.replica_metrics_urls", "ray.serve")
    from fovea.entrypoints.ray.replica_metrics import replica_metrics_urls as urls

    return urls(name)

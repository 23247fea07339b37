"""`/metrics` across replicas: each engine replica serves its own Prometheus registry (the single-process
server's metrics, unchanged) on a port of its own and lists it in a directory actor; the ingress's `/metrics`
fetches every listed replica and answers their union, each sample labelled `replica="<replica id>"`.

So one scrape of the Serve endpoint sees every replica; a Prometheus that should scrape replicas one by one
reads their addresses from `GET /metrics/replicas` (JSON: replica id -> URL) or `replica_metrics_urls()`.
The replica listens on its node's Ray address (loopback on a single-machine Ray): reachable inside the
cluster, like the replicas themselves.
"""
from __future__ import annotations

import asyncio

import httpx
import ray
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

NAMESPACE = "fovea"
FETCH_TIMEOUT_S = 5.0


@ray.remote(num_cpus=0)
class MetricsDirectory:
    """replica id -> the URL of its metrics (and its process id); one per Serve application."""

    def __init__(self) -> None:
        self._urls: dict[str, str] = {}
        self._pids: dict[str, int] = {}

    def register(self, replica: str, url: str, pid: int) -> None:
        self._urls[replica], self._pids[replica] = url, pid

    def unregister(self, replica: str) -> None:
        self._urls.pop(replica, None)
        self._pids.pop(replica, None)

    def urls(self) -> dict[str, str]:
        return dict(self._urls)

    def pids(self) -> dict[str, int]:
        """The replicas' process ids (on their nodes): what an operator or a test kills to fail one."""
        return dict(self._pids)


def directory_name(app_name: str) -> str:
    return f"metrics-directory:{app_name}"


def metrics_directory(app_name: str):
    """The application's directory actor, created by whoever asks first. Detached, so that it outlives a replica
    or the ingress that created it; `fovea.entrypoints.ray.serve.shutdown(name)` removes it."""
    return MetricsDirectory.options(name=directory_name(app_name), namespace=NAMESPACE, lifetime="detached",
                                    get_if_exists=True).remote()


def replica_metrics_urls(app_name: str = "fovea") -> dict[str, str]:
    """Each live replica's metrics URL, by replica id (call it from a driver connected to the cluster)."""
    return asyncio.run(live_replica_urls(app_name))


async def _scrape(app_name: str) -> dict[str, tuple[str, str]]:
    """replica id -> (its URL, its metrics text), of the replicas that answer. One that cannot be reached
    (it died; Serve replaces it under another id) is dropped from the directory."""
    directory = metrics_directory(app_name)
    urls: dict[str, str] = await directory.urls.remote()
    async with httpx.AsyncClient(timeout=FETCH_TIMEOUT_S) as client:
        replies = await asyncio.gather(*(client.get(url) for url in urls.values()), return_exceptions=True)
    answers = {}
    for (replica, url), reply in zip(urls.items(), replies):
        if isinstance(reply, httpx.TransportError):
            directory.unregister.remote(replica)
        elif not isinstance(reply, BaseException) and reply.status_code == 200:
            answers[replica] = (url, reply.text)
    return answers


async def live_replica_urls(app_name: str) -> dict[str, str]:
    return {replica: url for replica, (url, _) in (await _scrape(app_name)).items()}


async def merged_metrics(app_name: str) -> bytes:
    """Every live replica's metrics in one Prometheus text, each sample with a `replica` label."""
    families: dict[str, Metric] = {}
    for replica, (_, text) in (await _scrape(app_name)).items():
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            merged.samples += [Sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp, s.exemplar)
                               for s in family.samples]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


class _Families:
    def __init__(self, families: list[Metric]):
        self._families = families

    def collect(self):
        return iter(self._families)

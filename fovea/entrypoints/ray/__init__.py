"""fovea on Ray (the optional extra: `pip install 'fovea[ray]'`).

    serve.py     Ray Serve: the OpenAI server as K replicas behind one endpoint (`fovea serve --num-replicas K`,
                 or `deploy(...)` on an existing cluster); ingress.py, replica.py, routing.py, replica_metrics.py
    data.py      Ray Data: `batch_generate(dataset, model=...)`, one engine per actor
Both are re-exported as `fovea.ray`.

Each replica or actor owns an ordinary fovea engine built from the same options `LLM(...)` takes, so whatever
an engine can do (tensor/pipeline parallelism included) a replica does too. Importing this package does not
import Ray; using it without Ray installed raises `RayNotInstalledError` saying how to install it.
"""
from __future__ import annotations

from fovea.entrypoints.ray._require import INSTALL_HINT, RayNotInstalledError, require_ray

__all__ = ["INSTALL_HINT", "RayNotInstalledError", "ReplicaScaling", "ServeOptions", "batch_generate", "deploy",
           "replica_metrics_urls", "require_ray", "shutdown"]
_LAZY = {"batch_generate": "fovea.entrypoints.ray.data", "deploy": "fovea.entrypoints.ray.serve",
         "shutdown": "fovea.entrypoints.ray.serve", "replica_metrics_urls": "fovea.entrypoints.ray.serve",
         "ServeOptions": "fovea.entrypoints.ray.serve", "ReplicaScaling": "fovea.entrypoints.ray.serve"}


def __getattr__(name: str):
    # the entry points import Ray (and torch) when first used, not when fovea is imported
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

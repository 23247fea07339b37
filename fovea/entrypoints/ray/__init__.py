"""fovea on Ray (the optional extra: `pip install 'fovea[ray]'`).

    serve/       Ray Serve: the OpenAI server as K replicas behind one endpoint (`fovea serve --num-replicas K`,
                 or `deploy(...)` on an existing cluster)
    data.py      Ray Data: `batch_generate(dataset, model=...)`, one engine per actor (re-exported as `fovea.ray`)

Each replica or actor owns an ordinary fovea engine built from the same options `LLM(...)` takes, so whatever
an engine can do (tensor/pipeline parallelism included) a replica does too. Importing this package does not
import Ray; using it without Ray installed raises `RayNotInstalledError` saying how to install it.
"""
from __future__ import annotations

from fovea.entrypoints.ray._require import INSTALL_HINT, RayNotInstalledError, require_ray

__all__ = ["INSTALL_HINT", "RayNotInstalledError", "batch_generate", "require_ray"]


def __getattr__(name: str):
    # the entry points import Ray (and torch) when first used, not when fovea is imported
    if name == "batch_generate":
        from fovea.entrypoints.ray.data import batch_generate

        return batch_generate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

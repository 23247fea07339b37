"""`fovea.ray`: the Ray entry points under a short name (they live in `fovea.entrypoints.ray`).

    import fovea.ray
    fovea.ray.batch_generate(dataset, model=..., concurrency=2)     # Ray Data
    fovea.ray.deploy(model, num_replicas=2)                          # Ray Serve, on the cluster ray.init joined
"""
from fovea.entrypoints.ray import *  # noqa: F401,F403
from fovea.entrypoints.ray import __all__, __getattr__  # noqa: F401

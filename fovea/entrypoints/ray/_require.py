"""Ray is an optional dependency (`pip install 'fovea[ray]'`): every entry point imports it through here, so
a missing install is one clear error saying how to get it, not a bare ModuleNotFoundError."""
from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = "pip install 'fovea[ray]'"


class RayNotInstalledError(ImportError):
    pass


def require_ray(what: str, module: str = "ray") -> ModuleType:
    """Import `module` (ray, ray.serve, ray.data) for `what` (the feature asking), or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise RayNotInstalledError(f"{what} needs Ray ({module} could not be imported: {err}); install it with "
                                   f"{INSTALL_HINT}") from err

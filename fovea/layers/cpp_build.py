"""Compile fovea's small C++ CPU kernels on first use, once per process, with a torch fallback when that fails.

Each kernel module is built by torch.utils.cpp_extension.load_inline (cached under ~/.cache/torch_extensions)
with -O3 -march=native. If the build fails (no compiler, no ninja, ...) the caller gets None and uses its
torch path, which computes the same thing. FOVEA_NO_CPP_KERNELS=1 skips every kernel.
"""
from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_modules: dict[str, object] = {}


def load_kernels(name: str, source: str, functions: list[str], extra_cflags: tuple[str, ...] = ()):
    """The compiled module `name` (its `functions` callable from Python), or None when it cannot be built."""
    with _lock:
        if name in _modules:
            return _modules[name]
        module = None
        if os.environ.get("FOVEA_NO_CPP_KERNELS") != "1":
            try:
                from torch.utils.cpp_extension import load_inline

                module = load_inline(
                    name=name,
                    cpp_sources=source,
                    functions=functions,
                    extra_cflags=["-O3", "-march=native", "-fopenmp", *extra_cflags],
                    extra_ldflags=["-fopenmp"],
                    verbose=False,
                )
            except Exception as err:  # the torch path computes the same thing
                logger.warning("C++ kernels %s unavailable (%s); using the torch path", name, err)
        _modules[name] = module
        return module

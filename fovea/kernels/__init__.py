"""fovea's C++ CPU kernels: sources in `csrc/`, built as ONE torch extension on first use, and their wrappers.

    from fovea import kernels
    kernels.set_mode("require")        # or "auto" (the default), "off"; engines apply EngineConfig.cpu_kernels
    print(kernels.status().summary())  # cpu kernels: fused=on paged_attention=on amx_linear=off (no AMX ...) ...
    if kernels.can_fuse(x, w):
        y = kernels.rms_norm(x, w, 1e-6)

`build` compiles and caches the extension (key: sources, flags, compiler, CPU features, torch); `runtime` holds
the process-wide mode and says which paths are active; `ops`, `amx_linear`, `bf16_linear` and `int8_linear`
wrap the kernels.
"""
from fovea.kernels.build import KernelBuildError
from fovea.kernels.ops import (
    add_rms_norm_,
    can_fuse,
    extension,
    first_argmax,
    is_available,
    paged_decode,
    rms_norm,
    rotary_,
    rotary_paged_decode,
    silu_mul,
    write_kv_,
)
from fovea.kernels.runtime import MODES, RUNTIME, KernelStatus, PathStatus


def set_mode(mode: str) -> None:
    """"auto", "off" or "require" for this process (see `fovea.kernels.runtime`)."""
    RUNTIME.set_mode(mode)


def get_mode() -> str:
    return RUNTIME.mode


def status() -> KernelStatus:
    """Which CPU paths run here and why not (builds the extension on first call unless the mode is "off")."""
    return RUNTIME.status()


def configure(mode: str) -> KernelStatus:
    """`set_mode(mode)`, then `status()`: what an engine calls when it starts (logs the active paths once)."""
    RUNTIME.set_mode(mode)
    return RUNTIME.status()


__all__ = [
    "MODES", "RUNTIME", "KernelBuildError", "KernelStatus", "PathStatus", "add_rms_norm_", "can_fuse", "configure",
    "extension", "first_argmax", "get_mode", "is_available", "paged_decode", "rms_norm", "rotary_",
    "rotary_paged_decode", "set_mode", "silu_mul", "status", "write_kv_",
]

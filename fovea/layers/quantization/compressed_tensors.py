"""compressed-tensors checkpoints (what llm-compressor writes) in the int8 formats fovea runs.

config.json's `quantization_config` (quant_method "compressed-tensors") holds `config_groups`, each a scheme
(`weights`, `input_activations`) with the `targets` it applies to, and an `ignore` list. fovea runs:

- weights: int, 8 bits, symmetric, strategy "channel" (one scale per output row), static;
- input activations: none (W8A16) or int, 8 bits, symmetric, strategy "token", dynamic (W8A8);
- formats "int-quantized", "naive-quantized" (an int8 `weight`) and "pack-quantized" (`weight_packed` int32);
- targets as compressed-tensors matches them: "Linear" (every linear layer), an exact module name, or
  "re:<regex>" (`re.match` on the module name); names are the checkpoint's (transformers') module names.

Anything else (group or block scales, asymmetric zero points, static or float activations, 4-bit, output or
KV-cache quantization, sparsity, transforms) is refused with an error naming the field and what is supported.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

SUPPORTED_FORMATS = ("int-quantized", "naive-quantized", "pack-quantized")
SUPPORTED = ("int8 weights (num_bits 8, type int, symmetric, strategy 'channel', static) with no input "
             "activation quantization (W8A16) or int8 dynamic per-token symmetric input activations (W8A8), "
             f"format one of {', '.join(SUPPORTED_FORMATS)}")


@dataclass(slots=True, frozen=True)
class Int8Scheme:
    """One config group: how its layers are stored and run."""

    format: str
    is_dynamic_activation: bool  # W8A8; else weight-only (W8A16)
    targets: tuple[str, ...]

    @property
    def is_packed(self) -> bool:
        return self.format == "pack-quantized"


@dataclass(slots=True, frozen=True)
class CompressedTensorsConfig:
    schemes: tuple[Int8Scheme, ...]
    ignore: tuple[str, ...]

    def scheme_for(self, module_name: str, is_linear: bool) -> Int8Scheme | None:
        """The scheme of a (checkpoint-named) module, or None if it stays dense; `is_linear`: the class
        target "Linear" matches it."""
        if any(_matches(module_name, is_linear, target) for target in self.ignore):
            return None
        for scheme in self.schemes:
            if any(_matches(module_name, is_linear, target) for target in scheme.targets):
                return scheme
        return None


def _matches(name: str, is_linear: bool, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return (target == "Linear" and is_linear) or target == name


def _error(field: str, value: Any) -> ValueError:
    return ValueError(f"quantization_config: {field}={value!r} is not supported; fovea runs {SUPPORTED}")


def _check_args(prefix: str, args: dict, *, strategy: str, dynamic: bool) -> None:
    expected = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": strategy, "dynamic": dynamic}
    for key, want in expected.items():
        if args.get(key, want) != want:
            raise _error(f"{prefix}.{key}", args.get(key))
    if args.get("group_size") is not None:
        raise _error(f"{prefix}.group_size", args["group_size"])
    if args.get("block_structure") is not None:
        raise _error(f"{prefix}.block_structure", args["block_structure"])
    if args.get("actorder") not in (None, False, "static", "none"):
        raise _error(f"{prefix}.actorder", args["actorder"])


def parse_compressed_tensors_config(config: dict) -> CompressedTensorsConfig:
    """Validate config.json's `quantization_config`; raise ValueError naming the first unsupported field."""
    method = config.get("quant_method")
    if method != "compressed-tensors":
        raise ValueError(f"quantization_config.quant_method={method!r} is not supported; fovea loads "
                         f"'compressed-tensors' checkpoints ({SUPPORTED})")
    status = config.get("quantization_status", "compressed")
    if status != "compressed":
        raise _error("quantization_status", status)
    for key in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if config.get(key):
            raise _error(key, config[key])
    top_format = config.get("format")
    schemes = []
    for group_name, group in (config.get("config_groups") or {}).items():
        prefix = f"config_groups.{group_name}"
        fmt = group.get("format") or top_format
        if fmt not in SUPPORTED_FORMATS:
            raise _error(f"{prefix}.format", fmt)
        weights = group.get("weights")
        if weights is None:
            raise _error(f"{prefix}.weights", None)
        _check_args(f"{prefix}.weights", weights, strategy="channel", dynamic=False)
        activations = group.get("input_activations")
        if activations is not None:
            _check_args(f"{prefix}.input_activations", activations, strategy="token", dynamic=True)
        if group.get("output_activations") is not None:
            raise _error(f"{prefix}.output_activations", group["output_activations"])
        targets = tuple(group.get("targets") or ())
        for target in targets:
            if not (target == "Linear" or target.startswith("re:") or "." in target or target.islower()):
                raise ValueError(f"quantization_config: {prefix}.targets has {target!r}; fovea matches 'Linear', "
                                 f"module names and 're:' patterns")
        schemes.append(Int8Scheme(fmt, activations is not None, targets))
    if not schemes:
        raise ValueError("quantization_config has no config_groups: nothing says which layers are quantized")
    return CompressedTensorsConfig(tuple(schemes), tuple(config.get("ignore") or ()))

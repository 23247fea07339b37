"""Reading a PEFT LoRA adapter directory and checking it against the loaded model, before any request runs it.

A directory holds `adapter_config.json` and `adapter_model.safetensors` (what `PeftModel.save_pretrained`
writes). Tensors are named `base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r],
`<module>` being the base checkpoint's name of a linear layer (`model.layers.0.self_attn.q_proj`). fovea maps
that name as it maps the base checkpoint's weights (`rename_checkpoint_weight`, `packed_modules_mapping`), so
`q_proj` lands on the q rows of the packed `qkv_proj` and nowhere else.

PEFT's LoRA: y = base(x) + scaling * B(A(x)), scaling = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)); B is
stored pre-multiplied by scaling. What fovea does not implement is refused, naming the option: DoRA, LoRA
biases, `modules_to_save`, per-module `rank_pattern` / `alpha_pattern`, embedding or lm_head adapters,
`fan_in_fan_out`, pickled `adapter_model.bin`.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fovea.lora.request import LoRARequest
from fovea.models.safetensors_mmap import SafetensorsFile

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": "a", ".lora_B.weight": "b"}

# option -> (value meaning "off", what to say): an adapter that turns one on is refused
_UNSUPPORTED_OPTIONS: dict[str, tuple[tuple, str]] = {
    "use_dora": ((False, None), "DoRA (use_dora=true)"),
    "bias": (("none", None), "LoRA bias training (bias != 'none')"),
    "lora_bias": ((False, None), "LoRA biases (lora_bias=true)"),
    "modules_to_save": ((None, [], ()), "modules_to_save (fully trained extra modules)"),
    "rank_pattern": ((None, {}), "per-module ranks (rank_pattern)"),
    "alpha_pattern": ((None, {}), "per-module alphas (alpha_pattern)"),
    "fan_in_fan_out": ((False, None), "fan_in_fan_out (Conv1D-style weights)"),
    "layer_replication": ((None, []), "layer_replication"),
    "trainable_token_indices": ((None, [], {}), "trainable_token_indices"),
    "target_parameters": ((None, []), "target_parameters (LoRA on raw parameters)"),
    "use_qalora": ((False, None), "QALoRA (use_qalora=true)"),
}

# fovea's module path of a base-checkpoint module name, its shard in a packed layer (None: the whole
# layer), or None when fovea has no such LoRA-capable layer
ModuleResolver = Callable[[str], "tuple[str, str | None] | None"]


@dataclass(slots=True)
class LoRALayerWeights:
    a: torch.Tensor  # [r, in_features]
    b: torch.Tensor  # [out_features of the layer or shard, r], already multiplied by the adapter's scaling


@dataclass(slots=True)
class LoRAAdapter:
    request: LoRARequest
    rank: int
    scaling: float
    # fovea module path -> shard name (None: the whole layer) -> weights
    weights: dict[str, dict[str | None, LoRALayerWeights]]


@dataclass(slots=True, frozen=True)
class AdapterConfig:
    rank: int
    lora_alpha: float
    use_rslora: bool

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def read_adapter_config(path: Path, name: str, max_rank: int, target_modules: tuple[str, ...]) -> AdapterConfig:
    """The options of `path/adapter_config.json` fovea runs; ValueError naming any other."""
    file = path / CONFIG_FILE
    if not file.is_file():
        raise ValueError(f"LoRA adapter {name!r}: no {CONFIG_FILE} in {str(path)!r} (a directory written by "
                         f"PEFT's save_pretrained)")
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"LoRA adapter {name!r}: {file} is not valid JSON: {err}") from None
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValueError(f"LoRA adapter {name!r}: peft_type {peft_type!r} is not supported; only LORA")
    for option, (off_values, what) in _UNSUPPORTED_OPTIONS.items():
        if raw.get(option) not in off_values:
            raise ValueError(f"LoRA adapter {name!r}: {what} is not supported (got {option}={raw.get(option)!r}); "
                             f"fovea runs plain LoRA / rsLoRA with bias='none'")
    rank = raw.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"LoRA adapter {name!r}: r={rank!r} must be a positive integer")
    if rank > max_rank:
        raise ValueError(f"LoRA adapter {name!r}: rank r={rank} exceeds max_lora_rank={max_rank}; "
                         f"start the engine with max_lora_rank >= {rank}")
    alpha = raw.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise ValueError(f"LoRA adapter {name!r}: lora_alpha={alpha!r} must be a number")
    targets = raw.get("target_modules")
    if isinstance(targets, (list, tuple)):  # a regex string is checked through the tensors it produced instead
        unknown = sorted(set(targets) - set(target_modules))
        if unknown:
            raise ValueError(f"LoRA adapter {name!r}: target_modules {unknown} are not supported for this model; "
                             f"supported: {', '.join(target_modules)} (the language model's projections)")
    return AdapterConfig(rank=rank, lora_alpha=float(alpha), use_rslora=bool(raw.get("use_rslora", False)))


def load_adapter(request: LoRARequest, *, max_rank: int, target_modules: tuple[str, ...], resolve: ModuleResolver,
                 layer_shapes: Mapping[str, Mapping[str | None, tuple[int, int]]], dtype: torch.dtype,
                 on_other_stage: Callable[[str], bool] = lambda module: False) -> LoRAAdapter:
    """Read and check one adapter: every tensor must land on a LoRA-capable layer of this model with matching
    shapes, every module must have both A and B. `layer_shapes`: fovea module path -> shard -> (in, out).
    `on_other_stage(module)`: the module is a LoRA target that another pipeline stage builds; its tensors are
    neither read nor checked here (that stage does both), and an adapter none of whose tensors is this stage's
    holds no weights here."""
    name, path = request.lora_name, Path(request.lora_path)
    config = read_adapter_config(path, name, max_rank, target_modules)
    file = path / WEIGHTS_FILE
    if not file.is_file():
        pickled = (path / "adapter_model.bin").is_file()
        raise ValueError(f"LoRA adapter {name!r}: no {WEIGHTS_FILE} in {str(path)!r}"
                         + ("; adapter_model.bin is pickled, which fovea never loads (save with safetensors)"
                            if pickled else ""))
    parts: dict[tuple[str, str | None], dict[str, torch.Tensor]] = {}
    num_elsewhere = 0
    with SafetensorsFile(file) as f:
        for key in f.keys():
            suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
            if suffix is None or not key.startswith(_PEFT_PREFIX):
                raise ValueError(f"LoRA adapter {name!r}: tensor {key!r} is not a LoRA A/B weight "
                                 f"('{_PEFT_PREFIX}<module>.lora_A.weight' / '.lora_B.weight'); embedding, "
                                 f"magnitude (DoRA) and bias tensors are not supported")
            module = key[len(_PEFT_PREFIX):-len(suffix)]
            if on_other_stage(module):
                num_elsewhere += 1
                continue
            target = resolve(module)
            if target is None:
                raise ValueError(f"LoRA adapter {name!r}: module {module!r} is not one fovea applies LoRA to; "
                                 f"supported: the language model's {', '.join(target_modules)}")
            parts.setdefault(target, {})[_SUFFIXES[suffix]] = f.get(key).to(torch.float32, copy=True)  # off the mmap
    if not parts and not num_elsewhere:
        raise ValueError(f"LoRA adapter {name!r}: {WEIGHTS_FILE} holds no LoRA weights")
    weights: dict[str, dict[str | None, LoRALayerWeights]] = {}
    for (module, shard), ab in parts.items():
        where = module if shard is None else f"{module} ({shard})"
        if set(ab) != {"a", "b"}:
            raise ValueError(f"LoRA adapter {name!r}: {where} has lora_{'A' if 'a' in ab else 'B'} but not "
                             f"lora_{'B' if 'a' in ab else 'A'}")
        in_features, out_features = layer_shapes[module][shard]
        a, b = ab["a"], ab["b"]
        expected_a, expected_b = (config.rank, in_features), (out_features, config.rank)
        if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
            raise ValueError(f"LoRA adapter {name!r}: {where} has A {tuple(a.shape)} and B {tuple(b.shape)}; this "
                             f"model with r={config.rank} needs A {expected_a} and B {expected_b}")
        # scaled in float32, then cast: one rounding, as PEFT's own scaling of B(A(x)) in the model dtype
        weights.setdefault(module, {})[shard] = LoRALayerWeights(a=a.to(dtype), b=(b * config.scaling).to(dtype))
    return LoRAAdapter(request=request, rank=config.rank, scaling=config.scaling, weights=weights)

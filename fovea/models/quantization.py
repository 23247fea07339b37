"""Which linear layers of a model run an int8 method, decided once, after the model is built and before its
checkpoint is read (`fovea.models.weights.load_model`).

- A compressed-tensors checkpoint (config.json's `quantization_config`): the layers its config groups target,
  matched on the checkpoint's own module names (read from the safetensors headers), get
  `CompressedInt8LinearMethod`, whose parameters are the int8 tensors the file holds. Layers fovea stacks
  (q, k, v -> qkv_proj) must all share one scheme.
- `quantization="int8"`: every linear layer of the language model (the modules a `SupportsQuant` model names
  in `language_model_modules`), and its `lm_head` with `quantize_lm_head`, gets `Int8LinearMethod`: loaded
  dense, quantized once filled. The vision tower, Q-Former, projector and embeddings stay in the model dtype.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fovea.distributed import parallel_state as ps
from fovea.layers.linear import LinearBase, PackedLinear, set_weight_loader
from fovea.layers.quantization.compressed_tensors import parse_compressed_tensors_config
from fovea.layers.quantization.int8 import CompressedInt8LinearMethod, Int8LinearMethod
from fovea.models.interfaces import supports_quant
from fovea.models.safetensors_mmap import SafetensorsFile

QUANTIZATION_METHODS = ("int8", "compressed-tensors")
"""`EngineConfig.quantization` values; None runs the checkpoint as it is (compressed-tensors if it says so)."""


def prepare_quantization(model: nn.Module, hf_config_dict: dict, model_dir: str | Path, quantization: str | None,
                         quantize_lm_head: bool) -> int:
    """Set the int8 method of every layer that runs one (see the module docstring); returns how many."""
    checkpoint_config = hf_config_dict.get("quantization_config")
    if checkpoint_config is not None:
        if quantization not in (None, "compressed-tensors"):
            raise ValueError(f"quantization={quantization!r}: {model_dir} is already quantized "
                             f"(quant_method {checkpoint_config.get('quant_method')!r}); leave quantization unset")
        if quantize_lm_head:
            raise ValueError("quantize_lm_head applies to quantization='int8'; a quantized checkpoint's own config "
                             "says whether its lm_head is quantized")
        return _prepare_compressed_tensors(model, checkpoint_config, model_dir)
    if quantization is None:
        if quantize_lm_head:
            raise ValueError("quantize_lm_head=True needs quantization='int8'")
        return 0
    if quantization != "int8":
        raise ValueError(f"quantization={quantization!r}: {model_dir} has no quantization_config in config.json; "
                         f"quantize at load with quantization='int8'")
    return _prepare_int8(model, quantize_lm_head)


def _prepare_int8(model: nn.Module, quantize_lm_head: bool) -> int:
    if not supports_quant(model):
        raise ValueError(f"quantization='int8': {type(model).__name__} does not declare its language model "
                         f"(SupportsQuant), so fovea cannot tell which layers to quantize")
    prefixes = tuple(p + "." for p in model.language_model_modules)
    num = 0
    for name, module in model.named_modules():
        if isinstance(module, LinearBase) and (name.startswith(prefixes) or
                                               (quantize_lm_head and name == model.lm_head_module)):
            module.method = Int8LinearMethod()
            num += 1
    if num == 0:
        raise ValueError(f"quantization='int8': no linear layer under {list(model.language_model_modules)} "
                         f"in {type(model).__name__}")
    return num


def _prepare_compressed_tensors(model: nn.Module, checkpoint_config: dict, model_dir: str | Path) -> int:
    from fovea.models.weights import map_checkpoint_name, safetensors_files  # weights imports this module

    if ps.tp_size() > 1:  # its int8 tensors and scales would need loaders that slice them per rank: not built
        raise ValueError(f"tensor_parallel_size={ps.tp_size()}: compressed-tensors checkpoints ({model_dir}) run with "
                         f"tensor_parallel_size=1 only; a dense checkpoint with quantization='int8' (quantized at "
                         f"load, each rank its own slice) runs under tensor parallelism")
    config = parse_compressed_tensors_config(checkpoint_config)
    schemes_of: dict[str, dict[str, object]] = {}  # fovea module -> {checkpoint module: scheme or None}
    for path in safetensors_files(model_dir):
        with SafetensorsFile(path) as f:
            names = f.keys()
        for name in names:
            suffix = next((s for s in (".weight", ".weight_packed") if name.endswith(s)), None)
            if suffix is None:
                continue
            target = map_checkpoint_name(model, name)
            if target is None:
                continue
            module_name = target.param.rsplit(".", 1)[0]
            try:
                is_linear = isinstance(model.get_submodule(module_name), LinearBase)
            except AttributeError:
                continue  # loading names the stray tensor
            checkpoint_module = name[: -len(suffix)]
            schemes_of.setdefault(module_name, {})[checkpoint_module] = config.scheme_for(checkpoint_module, is_linear)
    num = 0
    for module_name, by_source in schemes_of.items():
        schemes = set(by_source.values())
        if len(schemes) > 1:
            listing = ", ".join(f"{n}: {'int8' if s else 'dense'}" for n, s in sorted(by_source.items()))
            raise ValueError(f"quantization_config quantizes the projections fovea stacks into {module_name!r} "
                             f"differently ({listing}); they must share one scheme")
        (scheme,) = schemes
        if scheme is None:
            continue
        layer = model.get_submodule(module_name)
        if not isinstance(layer, LinearBase):
            raise ValueError(f"quantization_config quantizes {sorted(by_source)}, which fovea runs as "
                             f"{type(layer).__name__}; only linear layers can be int8")
        _replace_method(layer, CompressedInt8LinearMethod(scheme.is_packed, scheme.is_dynamic_activation))
        num += 1
    return num


def _replace_method(layer: LinearBase, method: CompressedInt8LinearMethod) -> None:
    """Swap a freshly built layer's dense weight for the parameters `method` loads (the bias is kept, with
    its loader)."""
    bias = layer._parameters.get("bias")
    del layer.weight  # never written: built under no_weight_init
    layer.method = method
    method.create_weights(layer, layer.in_features, layer.out_features, False, layer.params_dtype, False)
    if bias is not None:
        layer.bias = bias
    shards = tuple(layer.shard_sizes) if isinstance(layer, PackedLinear) else ()
    for name, param in layer._parameters.items():
        if param is None or name == "bias":
            continue
        if name == "weight_shape":
            set_weight_loader(param, _weight_shape_loader(layer), shards)
        elif shards:
            set_weight_loader(param, layer._load_shard, shards)


def _weight_shape_loader(layer: LinearBase):
    """pack-quantized's `weight_shape` is metadata: checked against the layer (a shard's rows), not stored."""
    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None) -> None:
        rows = layer.out_features if shard_id is None else layer.shard_sizes.get(shard_id)
        if loaded.tolist() != [rows, layer.in_features]:
            raise ValueError(f"weight_shape {loaded.tolist()} vs expected {[rows, layer.in_features]}")
    return load

"""fovea's linear layers: each owns its parameters and delegates its math to a linear method.

- `Linear`: y = x @ W^T + b, replicated (the whole weight on every rank).
- `PackedLinear`: projections of the same input stacked into one matmul (q, k, v -> qkv_proj; gate, up ->
  gate_up_proj), each filled from its own checkpoint tensor.

Column- and row-parallel shards (tensor parallelism, a later issue) will be further subclasses of `LinearBase`
with their own weight loaders.

Which method runs (`fovea.layers.linear_methods`: dense torch, oneDNN-packed, AMX- or AVX-512-packed, or the
checkpoint's own row-major pages) is chosen when the layer's weights are loaded (`prepare_linear_layer`), and
`repr` names it. `state_dict()` returns the checkpoint's dense tensors whatever the method holds.

A parameter may carry `weight_loader(param, loaded, shard_id)` and `packed_shards` (the shard ids that together
fill it); `fovea.models.weights.load_weights` calls the loader for every checkpoint tensor mapped to the
parameter, and counts it filled once it got the whole tensor (`shard_id=None`) or every packed shard.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from fovea.layers.linear_methods import (DenseLinearMethod, LinearMethod, PanelLinearMethod,  # noqa: F401
                                         onednn_linear_available, select_linear_method)

WeightLoader = Callable[[nn.Parameter, torch.Tensor, "str | None"], None]

_initialize_weights = True


@contextlib.contextmanager
def no_weight_init() -> Iterator[None]:
    """Linear layers built inside leave their weights uninitialised (a checkpoint fills them next): no time
    spent drawing 4 billion random numbers, and no page of an unfilled weight is touched before it is loaded."""
    global _initialize_weights
    previous, _initialize_weights = _initialize_weights, False
    try:
        yield
    finally:
        _initialize_weights = previous


_pack_shards_at_load = False


@contextlib.contextmanager
def packing_shards_at_load() -> Iterator[None]:
    """Inside, a stacked layer (`PackedLinear`) whose method will be a panel-packed one packs each projection
    straight into its part of the packed weight as the checkpoint's tensor arrives, and one whose method runs
    from the file's pages (`BF16RowsLinearMethod`) keeps each projection as it arrives, instead of copying it
    into the stacked dense weight to be packed once all are in. Only where every loaded layer is prepared for
    inference right after (`fovea.models.weights.load_model`); training loads keep the dense weight."""
    global _pack_shards_at_load
    previous, _pack_shards_at_load = _pack_shards_at_load, True
    try:
        yield
    finally:
        _pack_shards_at_load = previous


def copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) (converting dtype) after checking the shapes match exactly."""
    if dst.shape != src.shape:
        raise ValueError(f"shape {tuple(src.shape)} vs expected {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src)


def set_weight_loader(param: nn.Parameter, loader: WeightLoader, packed_shards: tuple[str, ...]) -> None:
    param.weight_loader = loader
    param.packed_shards = packed_shards


class LinearBase(nn.Module):
    """in_features -> out_features through `self.method`; `params_dtype` is the dtype of the activations it
    takes and returns (its weights may be held in another form). `method` creates the parameters the
    checkpoint fills: None is the dense weight and bias; an int8 weight-only method would create its int8
    weight and scales instead, with no change to the model file that builds the layer."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype | None = None,
                 method: LinearMethod | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.params_dtype = dtype or torch.get_default_dtype()
        self.method = method or DenseLinearMethod()
        self.is_prepared = False  # see prepare_linear_layer
        # a packed copy of the weights on 2 MiB pages (decode streams them); `fovea.models.weights.place_layers` sets
        # it at load: never for an encoder's layers, per HUGE_PAGE_LAYERS for the language model's
        # (`fovea.kernels.panels.empty_packed` says why)
        self.huge_pages = True
        # part of the language model or its lm_head (`fovea.linear_methods.IN_PLACE_LAYERS` reads it); False for an
        # encoder's layers (`fovea.models.weights.place_layers`)
        self.is_language_model = True
        self.method.create_weights(self, in_features, out_features, bias, self.params_dtype, _initialize_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def _apply(self, fn, recurse=True):
        # .float() / .to(dtype) before loading (transformers' keep-in-float32 modules): follow the weights
        super()._apply(fn, recurse)
        weight = self._parameters.get("weight")
        if weight is not None:
            self.params_dtype = weight.dtype
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, tensor in self.method.checkpoint_tensors(self).items():
            destination[prefix + name] = tensor if keep_vars else tensor.detach()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, method={self.method.describe(self)}")


class Linear(LinearBase):
    """y = x @ W^T + b with the whole weight (replicated)."""


class PackedLinear(LinearBase):
    """Projections of the same input stacked into one matmul, e.g. q, k, v -> qkv_proj.

    `shard_sizes` names the checkpoint's separate projections in output order with their output sizes;
    forward returns the stacked output [..., sum(sizes)], `split` cuts it back into one view per shard.
    """

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = True,
                 dtype: torch.dtype | None = None, method: LinearMethod | None = None):
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias, dtype=dtype, method=method)
        self.shard_sizes = dict(shard_sizes)
        self.shard_offsets: dict[str, int] = {}
        offset = 0
        for name, size in self.shard_sizes.items():
            self.shard_offsets[name] = offset
            offset += size
        for param in self.parameters():
            set_weight_loader(param, self._load_shard, tuple(self.shard_sizes))

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None) -> None:
        if shard_id is None:
            copy_checked(param.data, loaded)
            return
        if shard_id not in self.shard_sizes:
            raise ValueError(f"no shard {shard_id!r} in a layer packing {list(self.shard_sizes)}")
        method = self._shard_method() if param is self._parameters.get("weight") else None
        if method is not None:
            expected = (self.shard_sizes[shard_id], self.in_features)
            if tuple(loaded.shape) != expected:
                raise ValueError(f"shape {tuple(loaded.shape)} vs expected {expected}")
            if method.keeps_file_pages:  # the checkpoint's tensor itself (the file's pages), or one converted copy
                vars(self).setdefault("weight_shards", {})[shard_id] = (
                    loaded.detach() if loaded.dtype == param.dtype else loaded.to(param.dtype))
            else:
                method.pack_shard(self, loaded, self.shard_offsets[shard_id])
            return
        dst = param.data.narrow(0, self.shard_offsets[shard_id], self.shard_sizes[shard_id])
        copy_checked(dst, loaded)

    def _shard_method(self) -> LinearMethod | None:
        """Within `packing_shards_at_load`: the method this layer will run, chosen now from its (unwritten)
        weight's dtype and shape as `select_linear_method` would choose it once loaded, if it takes the
        projections one by one (packs each into its panels, or keeps each as it is); else None."""
        if not _pack_shards_at_load or self.is_prepared:
            return None
        method = select_linear_method(self) if type(self.method) is DenseLinearMethod else self.method
        if not (method.keeps_file_pages or (isinstance(method, PanelLinearMethod) and method.packs_shards(self))):
            return None
        self.method = method
        return method

    def split(self, stacked: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return stacked.split(list(self.shard_sizes.values()), dim=-1)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", shards={self.shard_sizes}"


def prepare_linear_layer(layer: LinearBase, keep_weight: bool = False) -> bool:
    """Choose the method that runs a loaded layer and let it repack the weights (inference only: packed
    methods have no autograd). `keep_weight`: the dense weight is shared with another module (a tied
    `lm_head`) and stays registered. Returns whether the layer now runs a packed method. A layer is prepared
    once; later calls only answer."""
    if not layer.is_prepared:
        layer.method = select_linear_method(layer)
        layer.method.process_weights_after_loading(layer, keep_weight=keep_weight)
        layer.is_prepared = True
    return not isinstance(layer.method, DenseLinearMethod)


def parameter_owners(model: nn.Module) -> dict[int, int]:
    """id(parameter) -> how many modules of `model` hold it (2 for a tied `lm_head`'s weight)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                owners[id(param)] = owners.get(id(param), 0) + 1
    return owners


def prepare_loaded_layer(layer: nn.Module, owners: dict[int, int]) -> bool:
    """`prepare_linear_layer` if `layer` is a linear layer (else False), keeping a shared weight."""
    if not isinstance(layer, LinearBase):
        return False
    weight = layer._parameters.get("weight")
    return prepare_linear_layer(layer, keep_weight=weight is not None and owners.get(id(weight), 1) > 1)


def prepare_linear_layers(model: nn.Module) -> int:
    """`prepare_linear_layer` for every linear layer of an already loaded `model`; returns how many run a
    packed method. (`fovea.models.weights.load_model` does this layer by layer while loading.)"""
    owners = parameter_owners(model)
    return sum(prepare_loaded_layer(module, owners) for module in model.modules())

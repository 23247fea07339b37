"""Linear methods: how a linear layer stores its weight and computes y = x @ W^T + b.

A layer (`fovea.layers.linear`) owns its parameters and hands the math to `layer.method`:

- `create_weights(layer, ...)` registers the parameters the checkpoint fills (dense: `weight` [N, K], `bias` [N]);
- `process_weights_after_loading(layer)` turns them into what `apply` reads (a packed layout, say) once every
  one is filled, releasing what is no longer needed. While loading, `layer.weight` may be the checkpoint file's
  own pages (`fovea.models.weights.load_weights` lends them): read it, never write into it; whatever the layer
  still holds in the file afterwards (the weight kept as it is, a view of it) is copied out by the loader, so a
  method need not copy, unless the method `keeps_file_pages` (`BF16RowsLinearMethod`: the layer runs from the
  file's pages, which stay mapped, copy-on-write, as long as the layer holds them);
- `apply(layer, x)` runs the layer; `checkpoint_tensors(layer)` gives back the checkpoint's dense tensors (what
  `state_dict()` returns, so a packed model still saves as the file it was loaded from).

Every layer is built with `DenseLinearMethod` (the weights a checkpoint holds); `select_linear_method` picks,
once its weights are loaded, the method that runs it. An int8 weight-only or LoRA-wrapped method creates and
reads other parameters through the same four calls, so model files never change.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fovea import kernels
from fovea.kernels import amx_linear, bf16_linear, panels, rows_linear
from fovea.kernels.runtime import cpu_has_amx
from fovea.models.safetensors_mmap import lies_in_a_file

if TYPE_CHECKING:
    from pathlib import Path

    from fovea.models.packed_cache import PackedWeightsCache


class LinearMethod:
    """Base: creates the dense weights of a checkpoint, `weight` [out, in] and an optional `bias` [out]."""

    name = "?"
    keeps_file_pages = False
    """Whether the loader leaves in the checkpoint's mapping the tensors this method keeps (no copy, no release)."""

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, bias: bool,
                       dtype: torch.dtype | None, initialize: bool) -> None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        layer.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None
        if initialize:  # nn.Linear's initialisation, so a layer trained from scratch starts where torch's would
            nn.init.kaiming_uniform_(layer.weight, a=5 ** 0.5)
            if layer.bias is not None:
                bound = 1 / math.sqrt(in_features) if in_features > 0 else 0.0
                nn.init.uniform_(layer.bias, -bound, bound)

    def process_weights_after_loading(self, layer: nn.Module, keep_weight: bool = False) -> None:
        """Repack `layer.weight` for `apply`; `keep_weight` (a weight another module shares, e.g. a tied
        `lm_head`) keeps the dense parameter registered for that module, at the cost of a second copy."""

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def checkpoint_tensors(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        """The layer's tensors as the checkpoint holds them (dense `weight` [out, in], `bias`)."""
        return {name: p for name, p in layer._parameters.items() if p is not None}

    def describe(self, layer: nn.Module) -> str:
        """What `repr(layer)` shows after `method=`: the name, and which kernel where the method picks one at load."""
        return self.name


class DenseLinearMethod(LinearMethod):
    """torch's `F.linear` on the dense weight: training (autograd), float16, and wherever no packed path runs."""

    name = "dense"

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)


class PackedLinearMethod(LinearMethod):
    """A CPU layout prepared once at load; the dense `weight` parameter is released (unless shared)."""

    def process_weights_after_loading(self, layer: nn.Module, keep_weight: bool = False) -> None:
        weight = layer.weight.detach()
        layer.packed_weight = self.pack(weight, layer)
        if not keep_weight:
            del layer.weight  # its storage goes now: loading never holds the dense and packed copies of all layers

    def pack(self, weight: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def unpack(self, packed: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def checkpoint_tensors(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        tensors = super().checkpoint_tensors(layer)
        if "weight" not in tensors:
            tensors = {"weight": self.unpack(layer.packed_weight, layer), **tensors}
        return tensors


PREPACK_BATCH_HINT = 64
"""Rows oneDNN tunes the packed layout for; measured fast from 1 to several thousand rows either way."""

BF16_SLOW_ROWS = range(17, 33)
"""bfloat16 inputs with this many rows are padded with zero rows to `BF16_SLOW_ROWS.stop`: oneDNN (3.12, AMX,
2 threads) runs them ~1.5x slower than 16 or 33 rows (Qwen2-0.5B's 896 x 9728 gate/up weight: 2.4 ms at 32 rows,
1.6 ms at 33, weights cold in memory), and decode batches sit right there. float32 has no such step."""


class OneDNNLinearMethod(PackedLinearMethod):
    """oneDNN's packed linear: on this class of machine torch's default CPU matmul (MKL) reaches ~150 GFLOP/s
    in float32 where oneDNN's packed kernels reach ~400 (bfloat16 gains 1.1-1.7x); the same float32
    arithmetic in a different summation order. The packed weight is an opaque `torch._mkldnn` tensor."""

    name = "onednn"

    def pack(self, weight: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight, PREPACK_BATCH_HINT)

    def unpack(self, packed: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        return packed.to_dense()

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if x.dim() == 2 and rows in BF16_SLOW_ROWS and x.dtype == torch.bfloat16:
            padded = x.new_zeros(BF16_SLOW_ROWS.stop, x.shape[1])
            padded[:rows] = x
            return torch.ops.mkldnn._linear_pointwise(padded, layer.packed_weight, layer.bias, "none", [], "")[:rows]
        return torch.ops.mkldnn._linear_pointwise(x, layer.packed_weight, layer.bias, "none", [], "")


class PanelLinearMethod(PackedLinearMethod):
    """fovea's own bfloat16 kernels, which share one packed layout (`fovea.kernels.panels`): weight
    [N'/32, K'/32, 2, 16, 16, 2] (N and K padded to 32), bias float32 in `layer.panel_bias` (the kernels add it
    before their one rounding). Subclasses say which kernel reads it."""

    def pack(self, weight: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        layer.panel_bias = None if layer.bias is None else layer.bias.detach().float()
        packed = vars(layer).pop("packed_by_shard", None)
        if packed is None:
            packed = self._cached_panels(layer, weight.dtype)
        if packed is None:
            packed = self.pack_panels(weight, self._new_panels(layer, weight.dtype))
        vars(layer).pop("panels_from_cache", None)
        pending = vars(layer).pop("pending_panels", None)
        return packed if pending is None else pending.commit()

    @staticmethod
    def _cache_file(layer: nn.Module, dtype: torch.dtype) -> tuple[PackedWeightsCache, Path, tuple[int, ...]] | None:
        """(cache, file, packed shape) of the layer's panels in the packed weights cache (`fovea.models.
        packed_cache`), where it is on for the layer (`layer.panel_cache`: set by `fovea.models.weights.load_model`)."""
        entry = vars(layer).get("panel_cache")
        if entry is None:
            return None
        cache, name = entry
        path = cache.path(name, (layer.out_features, layer.in_features), dtype, _tp_of(layer))
        return cache, path, panels.packed_shape(layer.out_features, layer.in_features)

    def _cached_panels(self, layer: nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
        """The layer's panels mapped from the packed weights cache, if it holds them."""
        file = self._cache_file(layer, dtype)
        packed = None if file is None else file[0].lookup(file[1], file[2], dtype, layer.huge_pages)
        if packed is not None:
            layer.panels_from_cache = True
        return packed

    def _new_panels(self, layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """Unwritten panels for the layer: a new file of the packed weights cache where it is on (the layer's
        `pending_panels` until `pack` commits it), else memory of the process's own."""
        file = self._cache_file(layer, dtype)
        pending = None if file is None else file[0].create(file[1], file[2], dtype, layer.huge_pages)
        if pending is not None:
            layer.pending_panels = pending
            return pending.tensor
        return panels.empty_packed(layer.out_features, layer.in_features, dtype, layer.huge_pages)

    def packs_shards(self, layer: nn.Module) -> bool:
        """Whether `pack_shard` can take the stacked layer's projections one by one: each but the last starts a
        run of whole panels (a multiple of 32 rows), so each packs into its own panels, zero-padded at the end only
        where the stacked weight is."""
        return all(size % panels.BLOCK == 0 for size in list(layer.shard_sizes.values())[:-1])

    def pack_shard(self, layer: nn.Module, loaded: torch.Tensor, first_row: int) -> None:
        """While loading a stacked layer (`fovea.layers.linear.PackedLinear`, q/k/v -> qkv_proj): pack one
        projection [rows, K], as the checkpoint holds it, straight into its panels of the stacked packed weight,
        rows `first_row`.. of the dense one. No stacked dense copy is ever written (BLIP-2 OPT-2.7b: 1.3 GB of
        fresh memory, ~1.4 CPU-s, before the repack read it again); `pack` finds the panels filled."""
        packed = vars(layer).get("packed_by_shard")
        if packed is None:
            packed = self._cached_panels(layer, layer.weight.dtype)
            if packed is None:
                packed = self._new_panels(layer, layer.weight.dtype)
            layer.packed_by_shard = packed
        if vars(layer).get("panels_from_cache"):
            return  # the cache's file holds every projection already: nothing of this one is read
        first = first_row // panels.BLOCK
        rows = panels.padded(loaded.shape[0]) // panels.BLOCK
        panels.pack_weight(loaded.to(packed.dtype), out=packed[first:first + rows])

    def pack_panels(self, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return panels.pack_weight(weight, out=out)

    def unpack(self, packed: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        return panels.unpack_weight(packed, layer.out_features, layer.in_features)

    def describe(self, layer: nn.Module) -> str:
        packed = vars(layer).get("packed_weight")
        return f"{self.name}(cache)" if packed is not None and lies_in_a_file(packed) else self.name


def _tp_of(layer: nn.Module) -> tuple[int, int]:
    """(rank, ranks) of a tensor-parallel layer's slice; (0, 1) for a replicated layer."""
    return getattr(layer, "tp_rank", 0), getattr(layer, "tp_size", 1)


class AMXLinearMethod(PanelLinearMethod):
    """fovea's bfloat16 AMX kernel (`fovea.kernels.amx_linear`), for K and N multiples of 32."""

    name = "amx"

    def pack_panels(self, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return amx_linear.pack_weight(weight, out=out)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if AMX_HOST_DECODE_ROWS and x.numel() <= AMX_HOST_DECODE_ROWS * x.shape[-1] and bf16_linear.available():
            return bf16_linear.linear(x, layer.packed_weight, layer.out_features, layer.panel_bias)
        return amx_linear.linear(x, layer.packed_weight, layer.panel_bias)


AMX_HOST_DECODE_ROWS = 0
"""Rows at or below which a layer packed for AMX runs the AVX-512 BF16 kernel on the same packed weight instead.
0: AMX for every row count, until measured on an AMX host (`benchmarks/gemv.py` prints both kernels there): the
AMX kernel already reads decode weights at a Sapphire Rapids VM's `sum` bandwidth (fovea/kernels/amx_linear.py),
and no such host was available when the AVX-512 kernel was written."""


class BF16LinearMethod(PanelLinearMethod):
    """fovea's AVX-512 BF16 kernel (`fovea.kernels.bf16_linear`) for every row count, on hosts without AMX:
    decode (a few rows) streams the weights at close to the memory's read bandwidth, where oneDNN's packed linear
    reads them at about half of it, and prefill runs the same kernel on the same single packed copy (oneDNN's
    opaque layout cannot be shared). Any shape (the panels are zero-padded). `benchmarks/gemv.py` measures both
    against oneDNN."""

    name = "avx512-bf16"

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return bf16_linear.linear(x, layer.packed_weight, layer.out_features, layer.panel_bias)


class BF16RowsLinearMethod(LinearMethod):
    """fovea's AVX-512 BF16 kernel on the checkpoint's own row-major weight (`fovea.kernels.rows_linear`): no
    packed copy, so loading writes no fresh memory for the layer. Why: on this project's VMs the first write of
    each GB of fresh memory costs 2-2.5 CPU-s (2 MiB pages; `fovea.kernels.panels.empty_packed`), which was most
    of loading BLIP-2 OPT-2.7b (fovea 12.1 s vs transformers 2.7 s, quiet), while transformers writes nothing:
    its weights are views of the mapped file. The file's 4 KiB page-cache pages read as fast as anonymous 2 MiB
    pages (measured by `rows`), so decode need not pay for a copy either.

    The layer keeps `weight` [N, K] as the loader filled it: at load a view of the mapped file
    (`fovea.models.safetensors_mmap`: copy-on-write, so a write into it copies one page, never faults), else
    memory of its own (a weight converted from another dtype, a tensor-parallel slice copied by its loader). A
    stacked layer (`PackedLinear`) keeps each projection as it arrived (`weight_shards`, in any file and file
    order) and runs them as the kernel's `sources` in output order: the stacked weight is never written, and
    `state_dict()` concatenates them on demand. The bias runs in float32 (`rows_bias`), as the panel kernels'.
    `repr` says where the weight lives: `avx512-bf16-rows(file)` or `(memory)`."""

    name = "avx512-bf16-rows"
    keeps_file_pages = True

    def process_weights_after_loading(self, layer: nn.Module, keep_weight: bool = False) -> None:
        shards = vars(layer).pop("weight_shards", None)
        if shards is not None:  # a stacked layer filled shard by shard: its stacked weight was never written
            layer.rows_sources = tuple(shards[name] for name in layer.shard_sizes)
            del layer.weight
        else:  # the parameter's own tensor (not a copy): a write into the weight is what the layer runs
            layer.rows_sources = (layer.weight.detach(),)
        layer.rows_bias = None if layer.bias is None else layer.bias.detach().float()

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return rows_linear.linear(x, layer.rows_sources, layer.out_features, layer.rows_bias)

    def checkpoint_tensors(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        tensors = super().checkpoint_tensors(layer)
        if "weight" not in tensors:
            tensors = {"weight": torch.cat(layer.rows_sources), **tensors}
        return tensors

    def describe(self, layer: nn.Module) -> str:
        sources = vars(layer).get("rows_sources", ())
        where = "file" if any(lies_in_a_file(source) for source in sources) else "memory"
        return f"{self.name}({where})"


IN_PLACE_POLICIES = ("language_model", "encoders", "all", "none")
IN_PLACE_LAYERS = "none"
"""Which CPU bfloat16 layers run from the checkpoint's pages (`BF16RowsLinearMethod`) on a host without AMX:
"language_model": the language model's and `lm_head`'s (what a model's `language_model_modules` /
`lm_head_module` name, every layer of a model that names none; `LinearBase.is_language_model`), which decode
streams every token and which are most of the bytes; the encoders' layers (vision tower, Q-Former, projector)
keep the panel kernel, which runs their many-row steps from 4 KiB pages as fast. "encoders": the other way round
(the encoders' layers from the file, the language model packed: loading then writes only the language model's
panels). "all": every layer. "none":
every layer packs its panels (`BF16LinearMethod`, the method before in-place weights). Read when a layer's
method is chosen (at load); `in_place_layers(...)` switches it for a block: the engine's load runs inside
`in_place_layers(EngineConfig.in_place_weights)` (in every worker process), so this module value is the policy of
a bare `load_model` call (tests, training); "none", as `AUTO_IN_PLACE_LAYERS` (which says why)."""


AUTO_IN_PLACE_LAYERS = "none"
"""The policy `EngineConfig.in_place_weights = "auto"` (the default) runs where the checkpoint holds its weights in
the dtype they run in (`fovea.models.weights.in_place_policy`; elsewhere always "none": converted weights are copies
anyway). "none" since session 15's measurement (BLIP-2 OPT-2.7b, bfloat16, AMD EPYC, 2 threads, quiet, packed and
in-place engines in one process, steps alternating, `benchmarks/in_place_ab.py --policies none language_model`,
21:46-21:52 UTC): the in-place language model starts ~5x faster but decodes at 0.69x (1 request) and 0.87x (8
requests) of the packed one, TTFT 1.06x faster. "language_model" becomes the choice once decode runs at the packed
speed from the file's pages."""


@contextlib.contextmanager
def in_place_layers(policy: str) -> Iterator[None]:
    """`IN_PLACE_LAYERS = policy` inside (layers loaded inside keep the method chosen there)."""
    global IN_PLACE_LAYERS
    _check_policy(policy, f"in-place layer policy {policy!r}")
    previous, IN_PLACE_LAYERS = IN_PLACE_LAYERS, policy
    try:
        yield
    finally:
        IN_PLACE_LAYERS = previous


def _check_policy(policy: str, what: str) -> None:
    if policy not in IN_PLACE_POLICIES:
        raise ValueError(f"{what}; allowed: {', '.join(map(repr, IN_PLACE_POLICIES))}")


def runs_in_place(layer: nn.Module) -> bool:
    """Whether `IN_PLACE_LAYERS` names this layer."""
    _check_policy(IN_PLACE_LAYERS, f"IN_PLACE_LAYERS = {IN_PLACE_LAYERS!r}")
    in_lm = getattr(layer, "is_language_model", True)
    return IN_PLACE_LAYERS == "all" or IN_PLACE_LAYERS == ("language_model" if in_lm else "encoders")


def rows_linear_supports(weight: torch.Tensor) -> bool:
    """fovea's row-major AVX-512 BF16 kernel runs here and takes `weight` (CPU bfloat16, rows contiguous)."""
    return rows_linear.supports(weight)


def onednn_linear_available() -> bool:
    """oneDNN's packed linear runs here: torch has oneDNN and `cpu_kernels` is not "off"
    (`fovea.kernels.status().onednn_linear` says which)."""
    return kernels.status().onednn_linear.is_active


def amx_linear_supports(weight: torch.Tensor) -> bool:
    """fovea's AMX kernel runs here and takes `weight` (CPU bfloat16, K and N multiples of 32)."""
    return amx_linear.supports(weight)


def bf16_linear_supports(weight: torch.Tensor) -> bool:
    """fovea's AVX-512 BF16 kernel runs here and takes `weight` (CPU bfloat16, any shape)."""
    return bf16_linear.supports(weight)


def select_linear_method(layer: nn.Module) -> LinearMethod:
    """The method a loaded layer runs, from its weight's dtype, shape and device and the kernels usable here:
    AMX for CPU bfloat16 with K, N multiples of 32 (where `amx_linear_supports`), else, on a host without AMX,
    for CPU bfloat16: the row-major kernel on the checkpoint's pages for the layers `IN_PLACE_LAYERS` names
    (where `rows_linear_supports`), else AVX-512 BF16 on packed panels (where `bf16_linear_supports`), else
    oneDNN for CPU float32/bfloat16, else
    dense (float16, a bias of another dtype, `cpu_kernels="off"`, other devices). An AMX host keeps oneDNN for
    bfloat16 layers of other shapes: oneDNN runs AMX there, whose GEMM peak is ~3x AVX-512's, and prefill would
    lose more than decode gains (not measured: no AMX host was available)."""
    if type(layer.method) is not DenseLinearMethod:  # already chosen, or a method with weights of its own
        return layer.method
    weight, bias = layer.weight, layer.bias
    if (weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16) or weight.numel() == 0
            or (bias is not None and bias.dtype != weight.dtype) or not onednn_linear_available()):
        return layer.method
    if amx_linear_supports(weight):
        return AMXLinearMethod()
    if (weight.dtype == torch.bfloat16 and not cpu_has_amx() and runs_in_place(layer)
            and rows_linear_supports(weight)):
        return BF16RowsLinearMethod()
    if bf16_linear_supports(weight) and not cpu_has_amx():
        return BF16LinearMethod()
    return OneDNNLinearMethod()

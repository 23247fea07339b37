"""Load a Hugging Face checkpoint's safetensors into a fovea model, as the files are, strictly.

A model says how checkpoint names map onto its parameters with two class-level hooks:

- `packed_modules_mapping: dict[str, list[str]]`: a packed name and the checkpoint names it stacks, each a
  dotted-path segment (a module such as `q_proj` or a parameter such as `q_bias`). A checkpoint tensor whose
  name has the segment `q_proj` goes to the same name with `qkv_proj` in its place, as shard `"q_proj"`.
- `rename_checkpoint_weight(name) -> str | None` (optional): applied first; None means the tensor is
  deliberately not loaded (e.g. `lm_head.weight` when it is tied to the input embedding).
- `adapt_to_checkpoint(tensor_names)` (optional): called once with the file's tensor names before loading, for
  a structure the config does not decide (T5 ties `lm_head` to the token table only if the file has none).

Parameters may carry a `weight_loader` (see `fovea.layers.linear`); the default copies the whole tensor.
Every tensor must land in exactly one place and every parameter must be filled, with exactly matching
shapes; anything else is a ValueError naming the tensor.

A pipeline stage (fovea.distributed.pipeline) skips exactly the tensors that fall under a module another stage
builds (a `PPMissingLayer`); any other tensor without a parameter is still an error.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from fovea.distributed import parallel_state as ps
from fovea.distributed.pipeline import is_missing_weight, missing_prefixes
from fovea.layers.linear import (LinearBase, copy_checked, no_weight_init, packing_shards_at_load,
                                 parameter_owners, prepare_loaded_layer)
from fovea.kernels import panels
from fovea.layers import linear_methods
from fovea.models.interfaces import check_tensor_parallel
from fovea.models.quantization import prepare_quantization
from fovea.models.safetensors_mmap import SafetensorsFile, lies_in_a_file

if TYPE_CHECKING:  # packed_cache reads the checkpoint's files through this module
    from fovea.models.packed_cache import PackedWeightsCache

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(slots=True, frozen=True)
class WeightTarget:
    param: str  # fovea parameter name
    shard: str | None  # slice of a packed parameter; None = the whole parameter


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None) -> None:
    if shard_id is not None:
        raise ValueError(f"parameter is not packed, but got shard {shard_id!r}")
    copy_checked(param.data, loaded)


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory; pickled weights are refused, never opened."""
    model_dir = Path(model_dir)
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    if (model_dir / INDEX_FILE).is_file():
        weight_map = json.loads((model_dir / INDEX_FILE).read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for path in files:
            if not path.is_file():
                raise ValueError(f"{INDEX_FILE} in {model_dir} lists {path.name}, which does not exist")
        return files
    pickled = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in model_dir.glob(pattern))
    if pickled:
        raise ValueError(
            f"{model_dir} has only pickled weights ({', '.join(pickled)}); fovea does not load pickled weights, "
            f"safetensors is required (convert with `save_pretrained(..., safe_serialization=True)`)"
        )
    raise ValueError(f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}")


def checkpoint_tensor_names(model_dir: str | Path) -> set[str]:
    """Every tensor name of the checkpoint (headers only, no tensor read)."""
    names: set[str] = set()
    for path in safetensors_files(model_dir):
        with SafetensorsFile(path) as f:
            names.update(f.keys())
    return names


def checkpoint_float_dtype(model_dir: str | Path) -> torch.dtype | None:
    """The floating-point dtype holding most of the checkpoint's floating-point bytes (headers only); None if
    it has none."""
    per_dtype: dict[torch.dtype, int] = {}
    for path in safetensors_files(model_dir):
        with SafetensorsFile(path) as f:
            for name in f.keys():
                if f.dtype(name).is_floating_point:
                    per_dtype[f.dtype(name)] = per_dtype.get(f.dtype(name), 0) + f.nbytes(name)
    return max(per_dtype, key=per_dtype.get) if per_dtype else None


def in_place_policy(requested: str, model_dir: str | Path, dtype: torch.dtype) -> tuple[str, str]:
    """The `fovea.layers.linear_methods.IN_PLACE_LAYERS` policy a load with `EngineConfig.in_place_weights =
    requested` runs, and why. "auto": `linear_methods.AUTO_IN_PLACE_LAYERS` where the checkpoint holds its weights
    in `dtype` (the layers then run from the file's own bytes, and loading writes none of them), "none" where it holds
    them in another dtype (a float32 file served in bfloat16): every weight is converted into memory of its own
    anyway, and a copy runs fastest packed. Any other value is taken as it is."""
    if requested != "auto":
        return requested, "asked for"
    stored = checkpoint_float_dtype(model_dir)
    if stored == dtype:
        served = str(dtype).removeprefix("torch.")
        return linear_methods.AUTO_IN_PLACE_LAYERS, f"auto: the checkpoint holds its weights in {served}"
    where = str(stored).removeprefix("torch.") if stored is not None else "no floating-point dtype"
    return "none", (f"auto: the checkpoint holds its weights in {where}, served in "
                    f"{str(dtype).removeprefix('torch.')}: converted copies, packed")


def map_checkpoint_name(model: nn.Module, name: str) -> WeightTarget | None:
    rename = getattr(model, "rename_checkpoint_weight", None)
    if rename is not None:
        name = rename(name)
        if name is None:
            return None
    parts = name.split(".")
    for packed, shards in getattr(model, "packed_modules_mapping", {}).items():
        for shard in shards:
            if shard in parts:
                i = parts.index(shard)
                return WeightTarget(".".join(parts[:i] + [packed] + parts[i + 1:]), shard)
    return WeightTarget(name, None)


def _shard_name(param_name: str, shard: str, packed_mapping: dict[str, list[str]]) -> str:
    """The checkpoint name a missing shard would have had (qkv_proj.weight, shard k_proj -> k_proj.weight)."""
    for packed, shards in packed_mapping.items():
        if shard in shards and f".{packed}." in f".{param_name}.":
            return f".{param_name}.".replace(f".{packed}.", f".{shard}.", 1).strip(".")
    return f"{param_name} (shard {shard})"


def load_weights(model: nn.Module, model_dir: str | Path,
                 on_module_loaded: Callable[[nn.Module], None] | None = None) -> None:
    """Fill every parameter of `model` from the checkpoint in `model_dir`, converting to each one's dtype.

    `on_module_loaded(module)` runs for each module of `model` as soon as its own parameters are all filled
    (a tied parameter counts for every module holding it), before the next tensor is read: a linear layer
    repacks its weights there, so the dense copy is freed before the next layer loads. With such a hook, a
    parameter that a checkpoint tensor fills whole, in its own dtype (the default loader, no shard), is lent
    the file's pages instead of a copy: the hook reads them (a repack makes its own copy: one pass over the
    weight, not a copy and then a repack), and whatever its module still holds in the file afterwards is
    copied into memory of its own before the pages are handed back, unless the module is a linear layer whose
    method `keeps_file_pages` (`BF16RowsLinearMethod`): then its tensors stay views of the file (for every
    module holding them: a tied `lm_head` and the token embedding read one tensor), and the mapping lives as
    long as they do. The same holds for the projections a stacked layer keeps through its weight loader. The
    hook must not write into a lent weight; it replaces it instead.

    A file that could only be mapped read-only (`SafetensorsFile.is_copy_on_write` False: strict overcommit)
    keeps nothing: whatever a module holds in it is copied out, so no write can ever meet a read-only page.
    A module whose parameters span two files gets its tensors of the first copied out at that file's end
    (its method is not chosen yet).
    """
    params = dict(model.named_parameters())  # tied parameters appear once, under their first name
    unfilled_of: dict[int, list[nn.Module]] = {}  # id(param) -> modules holding it
    num_unfilled: dict[nn.Module, int] = {}
    if on_module_loaded is not None:
        for module in model.modules():
            own = [p for p in module._parameters.values() if p is not None]
            num_unfilled[module] = len(own)
            for p in own:
                unfilled_of.setdefault(id(p), []).append(module)
    loaded: dict[str, set[str | None]] = {}
    packed_mapping = getattr(model, "packed_modules_mapping", {})
    other_stages = missing_prefixes(model)  # modules another pipeline stage builds: their tensors are skipped
    for path in safetensors_files(model_dir):
        with SafetensorsFile(path) as f:
            lent: list[_Lent] = []  # tensors whose pages a parameter holds until its modules are done
            for name in f.keys():
                target = map_checkpoint_name(model, name)
                if target is None:
                    continue
                param = params.get(target.param)
                if param is None:
                    if other_stages and is_missing_weight(other_stages, target.param):
                        continue
                    if target.param in loaded:
                        raise ValueError(f"tensor {name!r} in {path.name} fills {target.param!r} a second time")
                    raise ValueError(
                        f"unexpected tensor {name!r} in {path.name}: {type(model).__name__} has no parameter "
                        f"{target.param!r}"
                    )
                done = loaded.setdefault(target.param, set())
                if target.shard in done or (None in done) or (target.shard is None and done):
                    raise ValueError(f"tensor {name!r} in {path.name} fills {target.param!r} a second time")
                tensor = f.get(name)
                holders = unfilled_of.get(id(param), [])
                if (target.shard is None and holders and not hasattr(param, "weight_loader")
                        and tensor.dtype == param.dtype and tensor.shape == param.shape):
                    param.data = tensor  # lent: see the docstring
                    lent.append(_Lent(name, holders))
                else:
                    loader = getattr(param, "weight_loader", default_weight_loader)
                    try:
                        loader(param, tensor, target.shard)
                    except ValueError as e:
                        raise ValueError(f"tensor {name!r} in {path.name} -> {target.param!r}: {e}") from None
                    # a stacked layer running in place keeps the projection's pages (`PackedLinear._load_shard`)
                    _give_back(_Lent(name, holders), f)
                del tensor
                done.add(target.shard)
                if _is_filled(param, done):
                    del params[target.param]  # the module may now replace it; keep no reference here
                    for module in unfilled_of.pop(id(param), ()):
                        num_unfilled[module] -= 1
                        if num_unfilled[module] == 0:
                            on_module_loaded(module)
                del param
                lent = [item for item in lent if not _give_back_if_done(item, f, num_unfilled)]
            for item in lent:  # modules with parameters in a later file: copy what they hold from this one
                _give_back(item, f)
    missing = []
    for param_name, param in params.items():
        done = loaded.get(param_name, set())
        shards = getattr(param, "packed_shards", ())
        if _is_filled(param, done):
            continue
        if not shards:
            missing.append(param_name)
        elif done:
            missing += [_shard_name(param_name, s, packed_mapping) for s in shards if s not in done]
        else:
            alternatives = ", ".join(_shard_name(param_name, s, packed_mapping) for s in shards)
            missing.append(f"{param_name} (or {alternatives})")
    if missing:
        shown = ", ".join(repr(m) for m in missing[:10])
        if len(missing) > 10:
            shown += f" and {len(missing) - 10} more"
        raise ValueError(f"missing tensor(s) in {model_dir}: {shown}")


@dataclass(slots=True)
class _Lent:
    name: str  # the checkpoint tensor
    holders: list[nn.Module]  # the modules holding the parameter it was lent to


def _give_back_if_done(item: _Lent, f: SafetensorsFile, num_unfilled: dict[nn.Module, int]) -> bool:
    if any(num_unfilled[module] for module in item.holders):
        return False
    _give_back(item, f)
    return True


def _give_back(item: _Lent, f: SafetensorsFile) -> None:
    """Copy out of the file whatever the holders still keep in it (a dense weight, a tensor a method kept as
    is), then drop the tensor's pages from the mapping; unless a holder runs from the file's pages."""
    if _keeps_pages(item.holders, f):
        return
    for module in item.holders:
        _copy_out(module, f)
    f.release(item.name)


def _keeps_pages(holders: list[nn.Module], f: SafetensorsFile) -> bool:
    """A holder is a linear layer whose method runs from the file's pages, and the file is copy-on-write."""
    return f.is_copy_on_write and any(
        isinstance(module, LinearBase) and module.method.keeps_file_pages for module in holders)


def _copy_out(module: nn.Module, f: SafetensorsFile) -> None:
    """Every tensor `module` holds in `f` replaced by a copy of its own."""
    _replace_held_tensors(module, lambda t: t.detach().clone() if f.holds(t) else t)


def _replace_held_tensors(module: nn.Module, replace: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Every tensor `module` holds itself (parameters, buffers, tensor attributes, the tensors of a dict or tuple
    attribute) passed through `replace`; where it returns another tensor, `module` holds that one instead (a
    parameter stays the same object, its data replaced: a tied one stays tied)."""
    for key, value in list(vars(module).items()):
        if key in ("_parameters", "_buffers"):
            for tensor in value.values():
                if tensor is not None and (new := replace(tensor)) is not tensor:
                    tensor.data = new
        elif isinstance(value, torch.Tensor):
            if (new := replace(value)) is not value:
                setattr(module, key, new)
        elif isinstance(value, dict):
            for k, t in list(value.items()):
                if isinstance(t, torch.Tensor) and (new := replace(t)) is not t:
                    value[k] = new
        elif isinstance(value, tuple):
            items = tuple(replace(t) if isinstance(t, torch.Tensor) else t for t in value)
            if any(a is not b for a, b in zip(items, value)):
                setattr(module, key, items)


def file_backed_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The tensors of `model` that are views of a checkpoint's mapping (the weights that run in place, a tied
    embedding with them), each region once (a tied weight is held by two modules), largest first."""
    regions: dict[tuple[int, int], torch.Tensor] = {}

    def note(tensor: torch.Tensor) -> torch.Tensor:
        if lies_in_a_file(tensor):
            regions.setdefault((tensor.data_ptr(), tensor.nbytes), tensor.detach())
        return tensor

    for module in model.modules():
        _replace_held_tensors(module, note)
    return sorted(regions.values(), key=lambda t: -t.nbytes)


def file_backed_bytes(model: nn.Module) -> int:
    """Bytes of `model`'s weights that live in the checkpoint's page cache (`file_backed_tensors`)."""
    return sum(t.nbytes for t in file_backed_tensors(model))


def _is_filled(param: nn.Parameter, done: set[str | None]) -> bool:
    shards = getattr(param, "packed_shards", ())
    return None in done or bool(shards and done >= set(shards))


def build_model(model_cls: type[nn.Module], hf_config, dtype: torch.dtype) -> nn.Module:
    """An inference model of `model_cls` in `dtype`, its weights not yet written (a checkpoint fills them):
    no time spent drawing random numbers, and no memory touched before each weight is loaded (BLIP-2
    OPT-2.7b: the embeddings' random init and the Q-Former's float32 conversion took 5-6 s of a busy
    machine's load). Loading is strict, so every parameter left unwritten here is filled or loading fails.

    In a tensor-parallel rank (`fovea.distributed.parallel_state.init_parallel`) the model is built split for
    the rank; a model class that cannot be split is refused here, naming what can."""
    check_tensor_parallel(model_cls, ps.tp_size(), hf_config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_weight_init(), _no_init_functions():
            model = model_cls(hf_config)
    finally:
        torch.set_default_dtype(previous)
    # `keep_in_fp32_modules` stay float32 whatever the model dtype (BLIP-2's Q-Former: more accurate than
    # transformers' bfloat16 one); `keep_in_fp32_modules_float16` only in a float16 model, transformers' rule for
    # its `_keep_in_fp32_modules` (T5's `wo`: float16's range is the danger, and a bfloat16 model runs it in
    # bfloat16, as transformers 5.23's `from_pretrained(dtype=torch.bfloat16)` does)
    names = tuple(getattr(model, "keep_in_fp32_modules", ()))
    if dtype == torch.float16:
        names += tuple(getattr(model, "keep_in_fp32_modules_float16", ()))
    for name in names:
        target = model.get_parameter(name) if "." not in name and isinstance(
            getattr(model, name, None), nn.Parameter) else model.get_submodule(name)
        if isinstance(target, nn.Parameter):
            target.data = torch.empty(target.shape, dtype=torch.float32)
        else:  # parameters are still unwritten: new float32 memory, untouched; buffers are converted
            target._apply(lambda t: torch.empty(t.shape, dtype=torch.float32) if isinstance(t, nn.Parameter)
                          else t.float() if t.is_floating_point() else t)
    return model.eval().requires_grad_(False)


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                   "sparse_")


@contextlib.contextmanager
def _no_init_functions() -> Iterator[None]:
    """torch's modules (nn.Embedding, nn.LayerNorm, nn.Conv2d) initialise their parameters through
    `torch.nn.init`; while the model is built these leave the tensor as it is (transformers' `no_init_weights`
    does the same)."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    for name in saved:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


HUGE_PAGE_POLICIES = ("auto", "language_model", "none")
HUGE_PAGE_LAYERS = "auto"
"""Which packed weights `load_model` asks onto 2 MiB pages (`fovea.kernels.panels.empty_packed(huge_pages=)`,
`LinearBase.huge_pages`): "language_model": the language model's and lm_head's, which decode streams every token
(fewer TLB misses); "none": no layer's. The encoders' layers never are (`place_layers`). "auto" (the default):
"none" on a VM whose host takes back the memory the guest frees (`fovea.kernels.panels.host_reclaims_free_memory`),
where a fresh 2 MiB page faults to the host on its first write and most 4 KiB pages do not; "language_model"
elsewhere. Measured on such a VM (BLIP-2 OPT-2.7b, bfloat16, AMD EPYC, 2 threads, session 16, README "Weights
that run from the checkpoint's pages"): the start was faster on 4 KiB pages in 5 of 6 pairs (6.6 s against 13.5
in one, transformers 3.9; how fast depends on what memory the host still backs), and decode ran at 0.88-1.01x
(1 request) and 0.92-1.14x (8 requests) of the 2 MiB pages' speed (four one-process A/B runs).
`huge_page_layers(...)` switches it for a block; the engine's load runs inside
`huge_page_layers(EngineConfig.huge_pages)` in every worker process."""


@contextlib.contextmanager
def huge_page_layers(policy: str) -> Iterator[None]:
    """`HUGE_PAGE_LAYERS = policy` inside (layers loaded inside keep the pages chosen there)."""
    global HUGE_PAGE_LAYERS
    huge_page_policy(policy)  # checked
    previous, HUGE_PAGE_LAYERS = HUGE_PAGE_LAYERS, policy
    try:
        yield
    finally:
        HUGE_PAGE_LAYERS = previous


def huge_page_policy(requested: str, cached: bool = False) -> tuple[str, str]:
    """What `requested` ("auto", "language_model" or "none") puts on 2 MiB pages on this machine, and why.
    `cached`: the packed weights go into the packed weights cache's files (`fovea.models.packed_cache`), whose
    pages outlive the process: "auto" then asks for 2 MiB pages wherever, since only a checkpoint's first start
    writes them (and every later start maps them, 2 MiB at a time)."""
    if requested not in HUGE_PAGE_POLICIES:
        raise ValueError(f"huge page policy {requested!r}; allowed: {', '.join(map(repr, HUGE_PAGE_POLICIES))}")
    if requested != "auto":
        return requested, "asked for"
    if cached:
        return "language_model", ("auto: the packed weights cache keeps them between starts, so only the first "
                                  "start writes its 2 MiB pages")
    if panels.host_reclaims_free_memory():
        return "none", ("auto: this VM's host takes back the memory it frees (virtio balloon free page reporting), "
                        "so fresh 2 MiB pages fault to it on their first write")
    return "language_model", "auto: fresh 2 MiB pages are ordinary memory here"


def place_layers(model: nn.Module, cached: bool = False) -> None:
    """Marks each linear layer as the language model's or not, and chooses its packed weights' pages. The layers
    outside a model's language model and `lm_head` (the vision tower, the Q-Former, the projector: what
    `language_model_modules` / `lm_head_module` leave out) get `is_language_model = False`, which
    `fovea.layers.linear_methods.IN_PLACE_LAYERS = "language_model"` reads, and ordinary pages: decode never reads
    them, and their first write costs far less on this project's VMs (`fovea.kernels.panels.empty_packed`). The
    language model's layers get 2 MiB pages where `huge_page_policy(HUGE_PAGE_LAYERS, cached)` says
    "language_model" (`cached`: their panels go into the packed weights cache). A model that does not say which
    modules are its language model counts every layer as its language model's."""
    lm_huge = huge_page_policy(HUGE_PAGE_LAYERS, cached)[0] == "language_model"
    prefixes = getattr(model, "language_model_modules", None)
    lm_prefixes = tuple(prefix + "." for prefix in prefixes) if prefixes is not None else None
    head = getattr(model, "lm_head_module", None)
    for name, module in model.named_modules():
        if not isinstance(module, LinearBase):
            continue
        in_lm = lm_prefixes is None or f"{name}.".startswith(lm_prefixes) or name == head
        module.is_language_model = in_lm
        module.huge_pages = in_lm and lm_huge


def load_model(model_cls: type[nn.Module], hf_config, model_dir: str | Path, dtype: torch.dtype,
               quantization: str | None = None, quantize_lm_head: bool = False,
               packed_cache: PackedWeightsCache | None = None) -> tuple[nn.Module, int]:
    """`build_model`, then fill it from `model_dir` strictly (see `load_weights`), each linear layer's method
    chosen and its weights repacked as soon as they are filled, so that loading holds about one copy of the
    weights, never two. Which layers run int8 (`quantization`, or the checkpoint's own quantization_config) is
    decided before loading (`fovea.models.quantization`). `packed_cache`: the checkpoint's entry of the packed
    weights cache (`fovea.models.packed_cache`), which panel layers map their weights from where it holds them
    and pack them into where not. Returns the model and how many of its linear layers run a packed or int8
    method."""
    model = build_model(model_cls, hf_config, dtype)
    place_layers(model, cached=packed_cache is not None)
    if packed_cache is not None:
        for name, module in model.named_modules():
            if isinstance(module, LinearBase):
                module.panel_cache = (packed_cache, name)
    adapt = getattr(model, "adapt_to_checkpoint", None)
    if adapt is not None:  # e.g. T5: an lm_head of its own, or the token table's, as the file has it
        adapt(checkpoint_tensor_names(model_dir))
    config_dict = json.loads((Path(model_dir) / "config.json").read_text())
    prepare_quantization(model, config_dict, model_dir, quantization, quantize_lm_head)
    owners = parameter_owners(model)
    num_packed = 0

    def prepare(module: nn.Module) -> None:
        nonlocal num_packed
        num_packed += prepare_loaded_layer(module, owners)

    with torch.no_grad(), packing_shards_at_load():
        load_weights(model, model_dir, on_module_loaded=prepare)
    return model, num_packed

"""The model runner's side of LoRA: which layers take adapters, adapters kept in memory, and batch slots.

- At load, every linear layer of the language model's decoder whose PEFT name (its own, or one of its packed
  shards') is a target the model declares (`SupportsLoRA`) gets a `LoRALinearMethod` over the method it runs
  (under tensor parallelism: over the rank's slice, with the rank's part of each adapter, fovea.lora.tensor_parallel).
- `add_adapter` reads and checks an adapter (fovea.lora.adapter) into a CPU cache of `max_cpu_loras`
  adapters, least recently used evicted first (a later request reads it from its directory again). A pipeline
  stage reads only the tensors of its own decoder layers; the other stages check theirs.
- `prepare_step` gives each adapter of the step a slot of the layers' stacked weights (`max_loras` slots;
  the least recently used slot whose adapter is not in this step is reused) and returns the rows mapping the
  layers read. The scheduler keeps the adapters of one batch within `max_loras`.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from fovea.distributed.pipeline import is_missing_weight, missing_prefixes
from fovea.layers.linear import LinearBase, PackedLinear
from fovea.lora.adapter import LoRAAdapter, load_adapter
from fovea.lora.layers import LoRALinearMethod, LoRAMapping
from fovea.lora.request import LoRARequest
from fovea.lora.tensor_parallel import checkpoint_shapes, keep_rank_part
from fovea.models.interfaces import supports_lora
from fovea.models.weights import map_checkpoint_name


class LoRAManager:
    def __init__(self, model: nn.Module, *, max_loras: int, max_lora_rank: int, max_cpu_loras: int,
                 dtype: torch.dtype):
        if not supports_lora(model):
            raise ValueError(f"{type(model).__name__} does not take LoRA adapters (enable_lora=True); fovea "
                             f"serves LoRA on BLIP-2 (OPT), LLaVA, OPT, Llama, Mistral, Qwen2 and Qwen2.5-VL")
        self.model = model
        self.max_loras, self.max_lora_rank, self.max_cpu_loras = max_loras, max_lora_rank, max_cpu_loras
        self.dtype = dtype
        self.target_modules: tuple[str, ...] = tuple(model.lora_target_modules)
        self.layers: dict[str, LinearBase] = {}
        self.layer_shapes: dict[str, dict[str | None, tuple[int, int]]] = {}
        for name, module in model.named_modules():
            if not isinstance(module, LinearBase) or not name.startswith(model.lora_layers_prefix):
                continue
            shards = dict(module.shard_sizes) if isinstance(module, PackedLinear) else {None: module.out_features}
            peft_names = [s for s in shards if s is not None] or [name.rsplit(".", 1)[-1]]
            if not set(peft_names) & set(self.target_modules):
                continue
            method = LoRALinearMethod(module.method, max_loras, max_lora_rank)
            method.create_lora_weights(module, dtype)
            module.method = method
            self.layers[name] = module
            # adapters are checked against the checkpoint's shapes; under tensor parallelism each rank then keeps
            # its part of them (fovea.lora.tensor_parallel)
            self.layer_shapes[name] = checkpoint_shapes(module)
        # pipeline stages: decoder layers another stage builds; their adapter tensors are that stage's to load
        self.other_stages = missing_prefixes(model)
        self.known: dict[int, LoRARequest] = {}  # every adapter ever added, by id
        self.cpu_cache: OrderedDict[int, LoRAAdapter] = OrderedDict()  # LRU order: oldest first
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # lora_int_id -> slot, LRU order

    # ---- adapters -------------------------------------------------------------------------------------------

    def add_adapter(self, request: LoRARequest) -> None:
        """Check and load an adapter (a no-op for one already loaded); ValueError naming what is wrong."""
        known = self.known.get(request.lora_int_id)
        if known is not None and known != request:
            raise ValueError(f"lora_int_id {request.lora_int_id} already names adapter {known.lora_name!r} at "
                             f"{known.lora_path!r}; give {request.lora_name!r} at {request.lora_path!r} another id")
        self._get(request)
        self.known[request.lora_int_id] = request

    def _get(self, request: LoRARequest) -> LoRAAdapter:
        adapter = self.cpu_cache.get(request.lora_int_id)
        if adapter is not None:
            self.cpu_cache.move_to_end(request.lora_int_id)
            return adapter
        adapter = keep_rank_part(load_adapter(request, max_rank=self.max_lora_rank, target_modules=self.target_modules,
                                              resolve=self._resolve, layer_shapes=self.layer_shapes, dtype=self.dtype,
                                              on_other_stage=self._on_other_stage),
                                 self.layers)
        self.cpu_cache[request.lora_int_id] = adapter
        while len(self.cpu_cache) > self.max_cpu_loras:
            self.cpu_cache.popitem(last=False)
        return adapter

    def _on_other_stage(self, module: str) -> bool:
        """A LoRA target in a decoder layer that another pipeline stage builds (a `PPMissingLayer` here): that stage
        reads and checks its tensors. (A module outside the decoder layers is refused by `_resolve` on every stage.)"""
        if not self.other_stages or module.rsplit(".", 1)[-1] not in self.target_modules:
            return False
        target = map_checkpoint_name(self.model, module + ".weight")
        return (target is not None and target.param.startswith(self.model.lora_layers_prefix)
                and is_missing_weight(self.other_stages, target.param))

    def _resolve(self, module: str) -> tuple[str, str | None] | None:
        """A base-checkpoint module name -> (fovea LoRA layer, shard), mapped as the base weights are."""
        if module.rsplit(".", 1)[-1] not in self.target_modules:
            return None
        target = map_checkpoint_name(self.model, module + ".weight")
        if target is None or not target.param.endswith(".weight"):
            return None
        layer = target.param[:-len(".weight")]
        if layer not in self.layer_shapes or target.shard not in self.layer_shapes[layer]:
            return None
        return layer, target.shard

    # ---- one step -------------------------------------------------------------------------------------------

    def prepare_step(self, rows: list[tuple[LoRARequest, int, int]]) -> LoRAMapping | None:
        """rows: (adapter, first flat row, count) per scheduled request that runs one. Loads the step's adapters
        into slots and returns the mapping the LoRA layers read (None: no adapter this step)."""
        ranges: dict[int, list[tuple[int, int]]] = {}
        requests: dict[int, LoRARequest] = {}
        for request, start, count in rows:
            ranges.setdefault(request.lora_int_id, []).append((start, count))
            requests[request.lora_int_id] = request
        if not ranges:
            return None
        if len(ranges) > self.max_loras:
            raise RuntimeError(f"{len(ranges)} adapters in one step, over max_loras={self.max_loras} "
                               f"(the scheduler keeps a batch within it)")
        segments = []
        for lora_id, spans in ranges.items():
            slot = self._activate(requests[lora_id], set(ranges))
            segments.append((slot, _rows(spans)))
        return LoRAMapping(segments)

    def _activate(self, request: LoRARequest, in_step: set[int]) -> int:
        lora_id = request.lora_int_id
        if lora_id in self.slot_of:
            self.slot_of.move_to_end(lora_id)
            return self.slot_of[lora_id]
        used = set(self.slot_of.values())
        free = [s for s in range(self.max_loras) if s not in used]
        if free:
            slot = free[0]
        else:
            victim = next(i for i in self.slot_of if i not in in_step)
            slot = self.slot_of.pop(victim)
        adapter = self._get(request)
        for name, layer in self.layers.items():
            layer.method.set_slot(layer, slot, adapter.weights.get(name))
        self.slot_of[lora_id] = slot
        return slot


def _rows(spans: list[tuple[int, int]]) -> slice | torch.Tensor:
    """Flat rows of (start, count) spans: a slice when they are one contiguous run (the common case: one
    request, or neighbours), else the row indices."""
    spans = sorted(spans)
    start, end = spans[0][0], spans[0][0] + spans[0][1]
    for s, n in spans[1:]:
        if s != end:
            return torch.cat([torch.arange(s, s + n) for s, n in spans])
        end = s + n
    return slice(start, end)

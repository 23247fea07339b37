"""EngineConfig: every engine option in one validated dataclass.

`LLM(model=..., **options)` builds it; an unknown option is an error that lists the valid names.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_EXECUTOR_BACKENDS = ("uni", "mp")
_CPU_KERNEL_MODES = ("auto", "off", "require")
_IN_PLACE_POLICIES = ("auto", "none", "language_model", "encoders", "all")  # + fovea.layers.linear_methods.IN_PLACE_POLICIES
_HUGE_PAGE_POLICIES = ("auto", "language_model", "none")  # fovea.models.weights.HUGE_PAGE_POLICIES
_QUANTIZATION_METHODS = ("int8", "compressed-tensors")  # fovea.models.quantization.QUANTIZATION_METHODS  # fovea.kernels.MODES, spelled out so this module imports no torch


# What one request's structured-outputs constraint may cost (a server client is untrusted). `max_bytes` is
# fovea's own (the constraint's text: schema JSON, regex, grammar, choices as JSON); the others are llguidance's
# parser limits (`llguidance.LLParserLimits`), which bound compile time and memory and each mask step's time by
# work counted as "fuel" (llguidance's figures: lexer ~50k fuel/ms at compile, ~14k/ms per step; Earley items
# ~20k/ms; a lexer state ~1-2 kB). Defaults are llguidance's except where noted.
STRUCTURED_OUTPUTS_LIMITS = {
    "max_bytes": 64 * 1024,  # fovea's: llguidance takes ~1 s to refuse a 100k-value enum (~1 MB); 64 kB is
    # a large JSON Schema, and bounds how deep a grammar can nest (see structured_output._STACK_BYTES)
    "max_grammar_size": 200_000,  # symbols in the grammar's productions (llguidance: 500k)
    "initial_lexer_fuel": 1_000_000,  # ~20 ms of regex analysis when a matcher is built
    "step_lexer_fuel": 200_000,  # ~14 ms of lexer work per sequence per step
    "step_max_items": 50_000,  # Earley items per sequence per step (~2.5 ms)
    "max_lexer_states": 20_000,  # per matcher, ~40 MB at most (llguidance: 250k, up to ~500 MB each)
    "max_items_in_row": 2_000,  # a production's branching factor
}


@dataclass
class EngineConfig:
    model: str
    """Directory written by `save_pretrained` (config.json, *.safetensors, tokenizer, processor config)."""
    tokenizer: str | None = None
    """Tokenizer directory; defaults to `model`."""
    dtype: str = "auto"
    """Weights and activations: "auto" (the checkpoint's torch_dtype, float16 promoted to bfloat16 on CPU),
    "float32", "bfloat16" or "float16"."""
    max_model_len: int | None = None
    """Longest prompt + output; defaults to the language model's max_position_embeddings."""
    max_num_seqs: int = 128
    """Most requests in one running batch."""
    max_num_batched_tokens: int | None = None
    """Token budget of one step; defaults to 2048 with chunked prefill, else max_model_len."""
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    block_size: int = 16
    """Tokens per KV cache block."""
    kv_cache_memory_bytes: int | None = None
    """Memory for the KV cache. None: sized from `memory_utilization` after a worst-case profiling pass."""
    memory_utilization: float = 0.5
    """Fraction of the machine's available memory (after weights and the profiled peak) given to the KV cache."""
    num_kv_blocks: int | None = None
    """Exact number of KV blocks (overrides the memory sizing; useful to force preemption in tests)."""
    limit_mm_per_prompt: dict[str, int] | None = None
    """Most items of each modality in one prompt; defaults to the model's own limits."""
    mm_processor_kwargs: dict[str, Any] | None = None
    """Preprocessing options for every request (a request's own `mm_processor_kwargs` override them)."""
    max_num_encoder_input_tokens: int | None = None
    """Encoder budget of one step, in encoder output tokens; defaults to max(max_num_batched_tokens, largest item)."""
    encoder_cache_size: int | None = None
    """Encoder outputs kept, in tokens; defaults to the encoder budget."""
    seed: int = 0
    """Seeds the engine's generator, which every unseeded random request draws from: the same requests in the
    same order sample the same tokens run after run (as vLLM's `seed`). Seeded requests keep their own."""
    num_threads: int | None = None
    """torch intra-op threads (per rank with tensor/pipeline parallelism); None leaves torch's default (with
    several ranks: the allowed CPUs shared equally among them)."""
    tensor_parallel_size: int = 1
    """Tensor-parallel ranks (vLLM's -tp): each holds a slice of every layer. With tensor_parallel_size *
    pipeline_parallel_size > 1 the engine spawns one worker process per rank (fovea.executor)."""
    pipeline_parallel_size: int = 1
    """Pipeline stages (vLLM's -pp): each rank holds a contiguous run of the language model's decoder layers."""
    distributed_executor_backend: str | None = None
    """Where the model runs (vLLM's option): "uni" in this process (one rank only), "mp" in one spawned worker
    process per rank (also for a single rank); None: "uni" for one rank, else "mp"."""
    cpu_kernels: str = "auto"
    """fovea's CPU kernels (C++ fused ops and paged attention, AMX and oneDNN-packed linears): "auto" uses them
    where they build and the CPU allows, "off" runs torch's own ops only, "require" makes a failed C++ build an
    error that shows the compiler's message. Applies to the whole process; the active paths are logged."""
    in_place_weights: str = "auto"
    """Which CPU bfloat16 linear layers run straight from the checkpoint's memory-mapped pages instead of a
    packed copy (hosts without AMX): "none" packs every layer (loading writes a copy of the weights, which is most of
    the load time), "language_model" runs the language model's and lm_head's from the file, "encoders" the vision
    tower's, Q-Former's and projector's (the language model packed), "all" every layer
    (no copy: loads as fast as transformers and holds the weights once, in the page cache). "auto":
    `fovea.layers.linear_methods.AUTO_IN_PLACE_LAYERS` where the checkpoint holds its weights in `dtype`, else
    "none" (converted weights are copies anyway, which run fastest packed). README "Weights that run from the
    checkpoint's pages" has the speed of each. Applies to every worker process; an AMX host packs for its AMX
    kernel whatever this says."""
    huge_pages: str = "auto"
    """Which packed weights are asked onto 2 MiB pages: "language_model" (the language model's and lm_head's, which
    decode streams every token: fewer TLB misses) or "none" (every layer on ordinary pages). "auto":
    "language_model" where the packed weights cache is on (`packed_weights_cache`: only a checkpoint's first start
    writes the pages) or the host is ordinary; "none" on a VM whose host takes back the memory the guest frees (a
    virtio balloon with free page reporting) when the cache is off, where a fresh 2 MiB page faults to the host on
    its first write (there "none" starts about twice as fast and decodes 0-12% slower at 1 request, README "Weights
    that run from the checkpoint's pages"). The encoders' layers always use ordinary pages. Applies to every worker
    process; the engine logs the choice."""
    packed_weights_cache: str = "auto"
    """Where the packed weights of each checkpoint are kept between starts (`fovea.models.packed_cache`): the
    first start packs each bfloat16 panel layer into a file there and runs from its pages; every later start of
    the same checkpoint maps the files instead of packing (BLIP-2 OPT-2.7b: 2.1 s instead of 9 s, transformers
    2.2; README "Weights that run from the checkpoint's pages", session 17). "auto": `$FOVEA_CACHE_DIR/packed-weights`,
    else `$XDG_CACHE_HOME/fovea/packed-weights`, else `~/.cache/fovea/packed-weights`; "off": pack in memory at every
    start; any other value is the directory (one that cannot be made or written: a warning, and packing in memory).
    An entry takes about the packed layers' size on disk and is deleted once its checkpoint is gone or changed."""
    quantization: str | None = None
    """None: the checkpoint as it is (int8 if its config.json has a compressed-tensors quantization_config).
    "int8": the language model's linear layers quantized at load to int8 per output channel (weight-only); the
    encoders, projector, embeddings and lm_head stay in `dtype`. "compressed-tensors": require that format."""
    quantize_lm_head: bool = False
    """With quantization="int8", quantize the lm_head too (its cost on logprobs is in the README)."""
    enable_lora: bool = False
    """Serve LoRA adapters (PEFT's format) on the language model's attention and MLP projections, chosen per
    request with a `LoRARequest` (vLLM's API); requests with different adapters, or none, share a batch."""
    max_loras: int = 1
    """Most distinct adapters in one batch (each has a slot of stacked weights in every LoRA layer)."""
    max_lora_rank: int = 16
    """Largest adapter rank `r` accepted; the slots are sized for it."""
    max_cpu_loras: int | None = None
    """Adapters kept loaded in memory, least recently used evicted (and read again when needed); None: max_loras."""
    structured_outputs_limits: dict[str, int] | None = None
    """Override some of what one structured-outputs constraint may cost, e.g. {"max_lexer_states": 5000}; the
    rest keep their defaults (`fovea.config.STRUCTURED_OUTPUTS_LIMITS`: max_bytes 65536, max_grammar_size
    200000, initial_lexer_fuel 1000000, step_lexer_fuel 200000, step_max_items 50000, max_lexer_states 20000,
    max_items_in_row 2000). A constraint over a limit is refused (ValueError / 400 naming it); one that reaches a
    per-step limit while generating finishes with reason "error" naming it."""

    def __post_init__(self) -> None:
        path = Path(self.model)
        if not (path / "config.json").is_file():
            raise ValueError(f"model={self.model!r}: no config.json there; pass a directory written by save_pretrained")
        if self.cpu_kernels not in _CPU_KERNEL_MODES:
            raise ValueError(f"cpu_kernels={self.cpu_kernels!r} is not supported; choose one of "
                             f"{', '.join(_CPU_KERNEL_MODES)}")
        if self.in_place_weights not in _IN_PLACE_POLICIES:
            raise ValueError(f"in_place_weights={self.in_place_weights!r} is not supported; choose one of "
                             f"{', '.join(_IN_PLACE_POLICIES)}")
        if not self.packed_weights_cache:
            raise ValueError("packed_weights_cache='' is not supported; choose 'auto', 'off' or a directory")
        if self.huge_pages not in _HUGE_PAGE_POLICIES:
            raise ValueError(f"huge_pages={self.huge_pages!r} is not supported; choose one of "
                             f"{', '.join(_HUGE_PAGE_POLICIES)}")
        if self.quantization is not None and self.quantization not in _QUANTIZATION_METHODS:
            raise ValueError(f"quantization={self.quantization!r} is not supported; choose one of "
                             f"{', '.join(_QUANTIZATION_METHODS)} or leave it unset (None)")
        if self.quantize_lm_head and self.quantization != "int8":
            raise ValueError("quantize_lm_head=True needs quantization='int8'")
        if self.distributed_executor_backend not in (None, *_EXECUTOR_BACKENDS):
            raise ValueError(f"distributed_executor_backend={self.distributed_executor_backend!r} is not supported; "
                             f"choose one of {', '.join(_EXECUTOR_BACKENDS)} or leave it unset (None)")
        if self.distributed_executor_backend == "uni" and self.tensor_parallel_size * self.pipeline_parallel_size > 1:
            raise ValueError(f"distributed_executor_backend='uni' runs one rank in this process; tensor_parallel_size="
                             f"{self.tensor_parallel_size} x pipeline_parallel_size={self.pipeline_parallel_size} "
                             f"needs 'mp' (one worker process per rank)")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; choose one of {', '.join(_DTYPES)}")
        for name in ("max_model_len", "max_num_batched_tokens", "kv_cache_memory_bytes", "num_kv_blocks",
                     "max_num_encoder_input_tokens", "encoder_cache_size", "num_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive integer or None")
        for name in ("max_num_seqs", "block_size", "tensor_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        for name in ("max_loras", "max_lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.enable_lora and self.quantization is not None:
            raise ValueError(f"enable_lora=True with quantization={self.quantization!r} is not supported yet: LoRA "
                             f"adapters run over float weights (dtype float32 / bfloat16); drop one of the two")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        elif (not isinstance(self.max_cpu_loras, int) or isinstance(self.max_cpu_loras, bool)
              or self.max_cpu_loras < self.max_loras):
            raise ValueError(f"max_cpu_loras={self.max_cpu_loras!r} must be an integer >= max_loras "
                             f"({self.max_loras}): every adapter of a batch is also kept in memory")
        limits = self.structured_outputs_limits or {}
        for name, value in limits.items():
            if name not in STRUCTURED_OUTPUTS_LIMITS:
                raise ValueError(f"structured_outputs_limits: unknown limit {name!r}; the limits are "
                                 f"{', '.join(STRUCTURED_OUTPUTS_LIMITS)}")
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"structured_outputs_limits[{name!r}]={value!r} must be a positive integer")
        self.structured_outputs_limits = {**STRUCTURED_OUTPUTS_LIMITS, **limits}
        if not 0.0 < self.memory_utilization <= 1.0:
            raise ValueError(f"memory_utilization={self.memory_utilization!r} must be in (0, 1]")
        if self.limit_mm_per_prompt is not None:
            for modality, count in self.limit_mm_per_prompt.items():
                if not isinstance(count, int) or count < 0:
                    raise ValueError(f"limit_mm_per_prompt[{modality!r}]={count!r} must be an integer >= 0")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> "EngineConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(names))}")
        return cls(model=str(model), **kwargs)

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model

    def read_json(self, name: str) -> dict | None:
        path = Path(self.model) / name
        return json.loads(path.read_text()) if path.is_file() else None

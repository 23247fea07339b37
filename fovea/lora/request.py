"""LoRARequest: the adapter one request runs with, as vLLM spells it (`vllm.lora.request.LoRARequest`).

Pure Python (no torch): it rides on the engine's `Request` through the scheduler and the prefix cache.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LoRARequest:
    """An adapter by name, a positive integer id that identifies it for the engine's lifetime, and its
    directory (PEFT's `adapter_config.json` + `adapter_model.safetensors`).

    The id keys the prefix cache and the adapter caches: one id must always name the same adapter directory
    (the engine refuses an id seen before with another name or path).
    """

    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"LoRARequest.lora_name must be a non-empty string, got {self.lora_name!r}")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"LoRARequest.lora_int_id must be an integer >= 1 (0 means no adapter), "
                             f"got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(f"LoRARequest {self.lora_name!r}: lora_path must name the adapter's directory")

    @property
    def cache_key(self) -> str:
        """What the prefix cache mixes into every block hash of a request running this adapter: the same
        tokens under two adapters have different KV, so they must never share blocks."""
        return f"lora:{self.lora_int_id}"

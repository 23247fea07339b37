"""LoRA adapters (PEFT's format) served next to the base model, several in one batch.

    request.py   LoRARequest: which adapter a request runs with (vLLM's name and fields)
    adapter.py   reading and validating a PEFT adapter directory against the loaded model
    layers.py    LoRALinearMethod: base(x) + B(A(x)) per row group, and the per-step row mapping context
    manager.py   the runner's side: which layers take adapters, adapters kept in memory (LRU), batch slots
"""

"""fovea: serve and train vision-language models.

    from fovea import LLM, SamplingParams
"""
import importlib

_EXPORTS = {
    "LLM": "fovea.engine.llm",
    "SamplingParams": "fovea.sampling_params",
    "StructuredOutputsParams": "fovea.sampling_params",
    "RequestOutput": "fovea.outputs",
    "CompletionOutput": "fovea.outputs",
    "Logprob": "fovea.outputs",
    "LoRARequest": "fovea.lora.request",
    "BeamSearchParams": "fovea.sampling_params",
    "BeamSearchOutput": "fovea.outputs",
    "BeamSearchSequence": "fovea.outputs",
}


def __getattr__(name: str):
    # imported on first use, so `import fovea.layers...` does not pull in torch-heavy engine modules
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fovea' has no attribute {name!r}")


__all__ = list(_EXPORTS)

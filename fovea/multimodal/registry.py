"""MULTIMODAL_REGISTRY: which processor, processing info and dummy inputs belong to a model class.

    @MULTIMODAL_REGISTRY.register_processor(MyProcessor, info=MyProcessingInfo, dummy_inputs=MyDummyInputs)
    class MyModelForConditionalGeneration(nn.Module): ...
"""
from __future__ import annotations

from dataclasses import dataclass

from fovea.multimodal.processing import BaseMultiModalProcessor, InputProcessingContext
from fovea.multimodal.profiling import BaseDummyInputsBuilder


@dataclass(frozen=True, slots=True)
class _Factories:
    processor: type[BaseMultiModalProcessor]
    info: type
    dummy_inputs: type[BaseDummyInputsBuilder]


class MultiModalRegistry:
    def __init__(self) -> None:
        self._factories: dict[type, _Factories] = {}

    def register_processor(self, processor: type[BaseMultiModalProcessor], *, info: type, dummy_inputs: type):
        def wrapper(model_cls: type) -> type:
            self._factories[model_cls] = _Factories(processor, info, dummy_inputs)
            return model_cls

        return wrapper

    def create_processor(self, model_cls: type, ctx: InputProcessingContext) -> BaseMultiModalProcessor:
        # a subclass of a registered model (e.g. a variant registered with fovea.models.registry.register_model)
        # keeps its parent's processor
        factories = next((self._factories[c] for c in model_cls.__mro__ if c in self._factories), None)
        if factories is None:
            raise ValueError(f"{model_cls.__name__} has no multimodal processor registered")
        info = factories.info(ctx)
        return factories.processor(info, factories.dummy_inputs(info))


MULTIMODAL_REGISTRY = MultiModalRegistry()

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
        try:
            factories = self._factories[model_cls]
        except KeyError:
            raise ValueError(f"{model_cls.__name__} has no multimodal processor registered") from None
        info = factories.info(ctx)
        return factories.processor(info, factories.dummy_inputs(info))


MULTIMODAL_REGISTRY = MultiModalRegistry()

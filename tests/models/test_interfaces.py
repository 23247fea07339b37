"""Models declare what they support by their bases; a declared interface must be implemented."""
from __future__ import annotations

import pytest
from torch import nn

from fovea.models.blip2 import Blip2ForConditionalGeneration
from fovea.models.interfaces import SupportsMRoPE, SupportsMultiModal, supports_mrope, supports_multimodal
from fovea.models.opt import OPTForCausalLM
from fovea.models.qwen2 import Qwen2ForCausalLM
from fovea.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration


@pytest.mark.parametrize("model_cls, multimodal, mrope", [
    (OPTForCausalLM, False, False),
    (Qwen2ForCausalLM, False, False),
    (Blip2ForConditionalGeneration, True, False),
    (Qwen2_5_VLForConditionalGeneration, True, True),
])
def test_each_model_declares_its_interfaces(model_cls, multimodal, mrope):
    assert (supports_multimodal(model_cls), supports_mrope(model_cls)) == (multimodal, mrope)


def test_an_attribute_is_not_a_declaration():
    class LooksMultiModal(nn.Module):
        supports_multimodal = True
        supports_mrope = True

    assert not supports_multimodal(LooksMultiModal) and not supports_mrope(LooksMultiModal())


def test_a_declared_interface_must_be_implemented():
    class Incomplete(nn.Module, SupportsMultiModal, SupportsMRoPE):
        pass

    with pytest.raises(TypeError, match="embed_multimodal"):
        Incomplete()

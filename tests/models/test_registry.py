"""register_model: a checkpoint naming a new architecture resolves to the registered class, and a malformed
class path is refused naming the form. (A registered subclass of a multimodal model serving images and video
with its parent's processor: tests/e2e/test_model_faults.py.)"""
import pytest

from fovea.models import registry
from fovea.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration


class Variant(Qwen2_5_VLForConditionalGeneration):
    pass


def test_a_registered_architecture_resolves(monkeypatch):
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))  # the registry is process-wide
    registry.register_model("VariantForTests", f"{__name__}:Variant")
    assert registry.resolve_model_class(["VariantForTests"]) is Variant
    assert "VariantForTests" in registry.supported_architectures()


@pytest.mark.parametrize("path", ["tests.models.test_registry.Variant", ":Variant", "tests.models:"])
def test_a_class_path_without_module_and_class_is_refused(path):
    with pytest.raises(ValueError, match="package.module:ClassName"):
        registry.register_model("X", path)

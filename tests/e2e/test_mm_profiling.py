"""Memory profiling runs the worst case the limits allow: a modality limited to 0 items per prompt is not in it."""
from __future__ import annotations

import pytest

from fovea import LLM
from fovea.worker.model_runner import ModelRunner
from tests.oracle.blip2 import build_tiny_blip2
from tests.oracle.qwen2_5_vl import build_tiny_qwen2_5_vl


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return str(build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen_profile"), seed=0))


@pytest.fixture
def profiled(monkeypatch):
    """The modality of each feature the engine profiled memory with, one list per LLM built."""
    calls: list[list[str]] = []
    profile = ModelRunner.profile_peak_bytes

    def spy(self, num_tokens, features):
        calls.append([f.modality for f in features])
        return profile(self, num_tokens, features)

    monkeypatch.setattr(ModelRunner, "profile_peak_bytes", spy)
    return calls


def build(path: str, **limits: int) -> LLM:
    return LLM(path, dtype="float32", block_size=4, max_model_len=256, limit_mm_per_prompt=limits or None)


def test_a_modality_limited_to_zero_is_not_profiled(qwen_dir, profiled):
    info = build(qwen_dir).llm_engine.processor.info
    assert profiled.pop() == ["video"]  # the control: a video gives the most tokens, so it is the worst case
    engine = build(qwen_dir, video=0).llm_engine
    images = profiled.pop()
    assert images and set(images) == {"image"}
    # and the largest item the scheduler makes room for is an image's, not the video's nobody can send
    assert engine.scheduler.config.max_tokens_per_mm_item == info.get_max_image_tokens()


@pytest.mark.parametrize("model, limits", [("qwen", dict(image=0, video=0)), ("blip2", dict(image=0))])
def test_every_modality_limited_to_zero_profiles_text_only(model, limits, qwen_dir, tmp_path, profiled):
    path = qwen_dir if model == "qwen" else build_tiny_blip2(tmp_path / "blip2", seed=0)
    engine = build(path, **limits).llm_engine
    assert profiled == [[]]
    assert engine.scheduler.config.max_tokens_per_mm_item == 0

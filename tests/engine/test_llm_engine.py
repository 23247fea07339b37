"""LLMEngine over EngineCore and the output processor: n > 1 requests are added all or none, and the engine's
seed makes unseeded sampling repeat run to run."""
from __future__ import annotations

import pytest

from fovea import LLM, SamplingParams
from fovea.engine.llm_engine import LLMEngine
from tests.oracle.qwen2_5_vl import build_tiny_qwen2

OPTIONS = dict(dtype="float32", block_size=4, num_kv_blocks=64, max_model_len=64)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(build_tiny_qwen2(tmp_path_factory.mktemp("engine_qwen2"), seed=0))


def run_all(engine: LLMEngine) -> dict:
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def test_n_children_are_added_all_or_none(ckpt):
    engine = LLM(ckpt, **OPTIONS).llm_engine
    engine.add_request("1_a", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=3))
    # "a" with n=2 runs as "0_a" and "1_a"; the second collides, so the first must not stay behind
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [5, 6, 7], SamplingParams(n=2, temperature=1.0, max_tokens=3))
    assert set(engine.scheduler.requests) == {"1_a"} and engine.get_num_unfinished_requests() == 1
    done = run_all(engine)
    assert list(done) == ["1_a"] and len(done["1_a"].outputs[0].token_ids) == 3
    assert not engine.scheduler.has_unfinished_requests()
    engine.add_request("a", [5, 6, 7], SamplingParams(n=2, temperature=1.0, max_tokens=3))  # the id is free now
    assert [len(c.token_ids) for c in run_all(engine)["a"].outputs] == [3, 3]


def test_the_engine_seed_makes_unseeded_sampling_repeat(ckpt):
    prompts = ["the quick brown fox", "jumps over", "the lazy dog"]
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)

    def texts(seed: int) -> list[str]:
        llm = LLM(ckpt, seed=seed, **OPTIONS)
        return [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]

    first = texts(0)
    assert texts(0) == first
    assert texts(1) != first

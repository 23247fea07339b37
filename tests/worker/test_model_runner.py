"""ModelRunner.execute on hand-built SchedulerOutputs: a new request, a chunked prefill continuing, decode, a
prefix hit, a preempted-then-resumed multimodal request and a finished one freed. The runner keeps its own
state from the messages alone; its greedy tokens must equal transformers' on the same prompts."""
from __future__ import annotations

import pytest
import torch
import transformers

from fovea.config import EngineConfig
from fovea.engine.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput
from fovea.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from fovea.models.qwen2_5_vl_processing import mrope_input_positions
from fovea.multimodal.processing import InputProcessingContext
from fovea.multimodal.registry import MULTIMODAL_REGISTRY
from fovea.outputs import ModelRunnerOutput
from fovea.sampling_params import SamplingParams
from fovea.worker.model_runner import ModelRunner
from tests.e2e.qwen_cases import chat, image
from tests.oracle.qwen2_5_vl import IMAGE_PLACEHOLDER, build_tiny_qwen2_5_vl, hf_reference

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("runner_qwen"), seed=0))


@pytest.fixture(scope="module")
def hf_config(ckpt):
    return transformers.AutoConfig.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def prompts(ckpt, hf_config):
    """A text prompt (ids, features=[]) and an image prompt (ids with the placeholders expanded, its feature)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    processor = MULTIMODAL_REGISTRY.create_processor(
        Qwen2_5_VLForConditionalGeneration, InputProcessingContext(ckpt, hf_config, tokenizer))
    text_ids = tokenizer(chat("the quick brown fox")).input_ids
    inputs = processor.apply(chat(f"{IMAGE_PLACEHOLDER}What is it?"), {"image": [image(3, 112, 84)]},
                             {"image": ["img-3"]})
    return (text_ids, []), (inputs.prompt_token_ids, inputs.mm_features)


@pytest.fixture(scope="module")
def references(ckpt, prompts):
    (text_ids, _), (mm_ids, (feature,)) = prompts
    text_ref, text_logprobs = hf_reference(ckpt, torch.tensor(text_ids), 5)
    mm_ref, _ = hf_reference(ckpt, torch.tensor(mm_ids), 4, pixel_values=feature.data["pixel_values"],
                             image_grid_thw=feature.data["image_grid_thw"])
    return text_ref, text_logprobs, mm_ref


@pytest.fixture
def runner(ckpt, hf_config):
    runner = ModelRunner(EngineConfig(model=ckpt, dtype="float32", block_size=4), hf_config,
                         Qwen2_5_VLForConditionalGeneration)
    runner.allocate_kv_cache(128)
    return runner


def new_request(hf_config, req_id, token_ids, features, block_ids, num_computed=0, params=GREEDY):
    positions, delta = mrope_input_positions(hf_config, token_ids, features)
    return NewRequestData(req_id, list(token_ids), params, None, list(features), positions, delta, block_ids,
                          num_computed)


def step(new=(), cached=(), tokens=None, encode=None, preempted=(), finished=(), freed=()) -> SchedulerOutput:
    """cached: (req id, resumed_from_preemption, new block ids, num_computed_tokens) per request."""
    data = CachedRequestData()
    for req_id, resumed, blocks, computed in cached:
        data.req_ids.append(req_id)
        data.resumed_from_preemption.append(resumed)
        data.new_block_ids.append(blocks)
        data.num_computed_tokens.append(computed)
    tokens = tokens or {}
    return SchedulerOutput(list(new), data, tokens, sum(tokens.values()), encode or {}, list(preempted),
                           list(finished), list(freed))


def blocks(first: int, num_tokens: int) -> list[int]:
    return list(range(first, first + -(-num_tokens // 4)))


def test_execute_follows_requests_through_chunks_decode_prefix_hits_preemption_and_finish(
        runner, hf_config, prompts, references):
    (a_ids, _), (b_ids, b_features) = prompts
    a_ref, a_logprobs, b_ref = references
    num_a, num_b = len(a_ids), len(b_ids)
    assert b_features[0].offset < 8 < num_b  # the first chunk of B reaches into its image
    with_logprobs = SamplingParams(temperature=0.0, max_tokens=8, logprobs=2)

    # 1: A whole (samples), B's first 8 tokens (its image encoded; mid-prompt, samples nothing)
    a_blocks, b_blocks = blocks(1, num_a + 4), blocks(20, 8)
    out = runner.execute(step(
        new=[new_request(hf_config, "A", a_ids, [], a_blocks, params=with_logprobs),
             new_request(hf_config, "B", b_ids, b_features, b_blocks)],
        tokens={"A": num_a, "B": 8}, encode={"B": [0]}))
    assert isinstance(out, ModelRunnerOutput)
    assert (out.req_ids, out.sampled_token_ids) == (["A"], [[a_ref[0]]])
    (entry,) = out.logprobs
    assert next(iter(entry)) == a_ref[0] and len(entry) >= 2
    assert entry[a_ref[0]].logprob == pytest.approx(a_logprobs[0][a_ref[0]].item(), abs=1e-4)
    a, b = runner.requests["A"], runner.requests["B"]
    assert a.token_ids == a_ids + [a_ref[0]] and a.output_token_ids == [a_ref[0]] and a.num_computed_tokens == num_a
    assert b.token_ids == b_ids and b.num_computed_tokens == 8 and b.block_ids == b_blocks
    assert b.mrope_positions.shape == (3, num_b) and list(runner.encoder_cache) == [b_features[0].mm_hash]

    # 2: A decodes; B's prefill continues to its end with the blocks it gains, and samples
    b_more = blocks(20 + len(b_blocks), num_b - 8)
    out = runner.execute(step(cached=[("A", False, [], num_a), ("B", False, b_more, 8)],
                              tokens={"A": 1, "B": num_b - 8}))
    assert (out.req_ids, out.sampled_token_ids, out.logprobs[1]) == (["A", "B"], [[a_ref[1]], [b_ref[0]]], None)
    assert b.block_ids == b_blocks + b_more and b.num_computed_tokens == num_b

    # 3: B is preempted (its image's output freed); A decodes; C = A's prompt, 8 tokens served by A's blocks
    c_blocks = a_blocks[:2] + blocks(60, num_a - 8)
    out = runner.execute(step(
        new=[new_request(hf_config, "C", a_ids, [], c_blocks, num_computed=8)],
        cached=[("A", False, [], num_a + 1)], tokens={"A": 1, "C": num_a - 8},
        preempted=["B"], freed=[b_features[0].mm_hash]))
    assert (out.req_ids, out.sampled_token_ids) == (["A", "C"], [[a_ref[2]], [a_ref[0]]])
    assert "B" in runner.requests and runner.encoder_cache == {}

    # 4: B resumes on new blocks and recomputes everything it has (prompt + its sampled token), image again
    b_new_table = blocks(70, num_b + 4)
    out = runner.execute(step(cached=[("A", False, [], num_a + 2), ("B", True, b_new_table, 0)],
                              tokens={"A": 1, "B": num_b + 1}, encode={"B": [0]}))
    assert (out.req_ids, out.sampled_token_ids) == (["A", "B"], [[a_ref[3]], [b_ref[1]]])
    assert b.block_ids == b_new_table and b.token_ids == b_ids + b_ref[:2]

    # 5: A and C finish: their state goes; B decodes on
    out = runner.execute(step(cached=[("B", False, [], num_b + 1)], tokens={"B": 1}, finished=["A", "C"]))
    assert (out.req_ids, out.sampled_token_ids) == (["B"], [[b_ref[2]]])
    assert set(runner.requests) == {"B"}


def test_a_step_with_nothing_scheduled_still_drops_finished_state(runner, hf_config, prompts):
    (a_ids, _), _ = prompts
    runner.execute(step(new=[new_request(hf_config, "A", a_ids, [], blocks(1, len(a_ids)))],
                        tokens={"A": len(a_ids)}))
    out = runner.execute(step(finished=["A"]))
    assert (out.req_ids, out.sampled_token_ids, out.logprobs) == ([], [], None) and runner.requests == {}


def test_seeded_requests_keep_their_generator_and_unseeded_ones_draw_from_the_engines(ckpt, hf_config, prompts):
    (a_ids, _), _ = prompts

    def sample(seed: int, params: SamplingParams) -> list[int]:
        runner = ModelRunner(EngineConfig(model=ckpt, dtype="float32", block_size=4, seed=seed), hf_config,
                             Qwen2_5_VLForConditionalGeneration)
        runner.allocate_kv_cache(32)
        torch.manual_seed(seed + 100)  # the global generator must not matter
        out = runner.execute(step(new=[new_request(hf_config, "A", a_ids, [], blocks(1, len(a_ids) + 8),
                                                   params=params)], tokens={"A": len(a_ids)}))
        tokens = out.sampled_token_ids[0]
        for n in range(len(a_ids), len(a_ids) + 5):
            tokens += runner.execute(step(cached=[("A", False, [], n)], tokens={"A": 1})).sampled_token_ids[0]
        return tokens

    unseeded = SamplingParams(temperature=1.0, max_tokens=8)
    assert sample(0, unseeded) == sample(0, unseeded) != sample(1, unseeded)
    seeded = SamplingParams(temperature=1.0, max_tokens=8, seed=5)
    assert sample(0, seeded) == sample(1, seeded)  # a request's own seed wins over the engine's

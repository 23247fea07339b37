"""A request that makes the model raise (tests/e2e/faulty_model.py) fails alone: in the same batch as images,
a video, text and seeded n=2 requests, with prefill chunks and prefix caching on, it finishes with finish
reason "error" while every other request gives exactly what it gives on the healthy model, and afterwards
nothing is left: no request, no suspect, every KV block free, the encoder cache empty."""
from __future__ import annotations

import pytest

from fovea import LLM, SamplingParams
from tests.e2e import faulty_model
from tests.e2e.qwen_cases import chat, frames, image
from tests.oracle.qwen2_5_vl import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, build_tiny_qwen2_5_vl

ENGINE = dict(dtype="float32", block_size=4, max_model_len=160, num_kv_blocks=200, max_num_seqs=8,
              max_num_batched_tokens=48, num_threads=1)
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
SEEDED = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)


def healthy_prompts() -> list[tuple[dict, SamplingParams]]:
    def item(text: str, images=(), videos=()) -> dict:
        mm = {k: list(v) for k, v in (("image", images), ("video", videos)) if v}
        return {"prompt": chat(text), **({"multi_modal_data": mm} if mm else {})}

    return [
        (item(f"{IMAGE_PLACEHOLDER}What is this?", [image(1, 90, 60)]), GREEDY),
        (item(f"{IMAGE_PLACEHOLDER} and {IMAGE_PLACEHOLDER}?", [image(2, 60, 90), image(1, 90, 60)]), GREEDY),
        (item(f"{VIDEO_PLACEHOLDER}What happens?", videos=[frames(3, 4, 70, 56)]), GREEDY),
        (item("Write a caption for a photo of a red kite over a beach."), GREEDY),
        (item(f"{IMAGE_PLACEHOLDER}Describe it.", [image(4, 120, 120)]), SEEDED),
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The healthy answers, and a faulty checkpoint whose trigger token none of them contains."""
    model_dir = build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen_faulty"), seed=0)
    llm = LLM(str(model_dir), **ENGINE)
    cases = healthy_prompts()
    outputs = llm.generate([p for p, _ in cases], [s for _, s in cases], use_tqdm=False)
    expected = [[tuple(c.token_ids) for c in o.outputs] for o in outputs]
    used = {t for o in outputs for t in o.prompt_token_ids} | {t for e in expected for ids in e for t in ids}
    fault_token_id = next(t for t in range(1, llm.llm_engine.tokenizer.vocab_size) if t not in used)
    prompt_ids = llm.llm_engine.tokenizer(chat("Hello! Please describe a photo of a red kite."))["input_ids"]
    del llm
    faulty_model.make_faulty(model_dir, fault_token_id)
    faulty_model.register()
    yield model_dir, cases, expected, fault_token_id, prompt_ids
    faulty_model.unregister()


def test_a_request_that_raises_in_the_model_fails_alone_and_leaks_nothing(setup):
    model_dir, cases, expected, fault_token_id, prompt_ids = setup
    llm = LLM(str(model_dir), **ENGINE)
    engine = llm.llm_engine
    # culprits: the trigger late in a long prompt (its first chunks run fine), and an n=2 request
    late = prompt_ids * 3 + [fault_token_id] + prompt_ids
    early = [fault_token_id] + prompt_ids
    prompts = [p for p, _ in cases[:2]] + [{"prompt_token_ids": late}] + [p for p, _ in cases[2:]] \
        + [{"prompt_token_ids": early}]
    params = [s for _, s in cases[:2]] + [GREEDY] + [s for _, s in cases[2:]] + [SEEDED]
    outputs = llm.generate(prompts, params, use_tqdm=False)

    failed = [outputs[2], outputs[-1]]
    healthy = outputs[:2] + outputs[3:-1]
    for output in failed:
        for c in output.outputs:
            assert c.finish_reason == "error" and "injected fault" in c.stop_reason, c
    assert [[tuple(c.token_ids) for c in o.outputs] for o in healthy] == expected
    assert all(c.finish_reason == "length" for o in healthy for c in o.outputs)

    scheduler = engine.scheduler
    assert scheduler.num_failed_steps >= 1 + 3  # the batch, then each of the three culprit sequences alone
    assert not engine.has_unfinished_requests()
    assert not scheduler.running and not scheduler.waiting and not scheduler.suspects and not scheduler.requests
    kv = scheduler.kv_cache_manager
    assert kv.num_free_blocks == kv.num_usable_blocks
    encoder = scheduler.encoder_cache_manager
    assert encoder.num_free_slots == encoder.cache_size

    # the engine goes on serving, and the prefix cache it kept is sound: the same requests again give the same
    again = llm.generate([p for p, _ in cases], [s for _, s in cases], use_tqdm=False)
    assert [[tuple(c.token_ids) for c in o.outputs] for o in again] == expected

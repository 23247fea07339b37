"""A longer run of the engine under mixed load (`make test-slow`): a tiny Qwen2.5-VL serving many requests at
once with a KV pool far too small for them (preemption and recompute), prefill chunks that split images,
prefix caching across requests that share a system prompt and images, seeded n=2 sampling, requests arriving
while others run, and aborts. Every request that finishes must give exactly what it gives alone on a roomy
engine, and afterwards nothing may be left behind: no request, and every KV block free."""
from __future__ import annotations

import random

import pytest

from fovea import LLM, SamplingParams
from tests.e2e.qwen_cases import chat, frames, image
from tests.oracle.qwen2_5_vl import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, build_tiny_qwen2_5_vl

pytestmark = pytest.mark.slow

SYSTEM = "You are a careful assistant. Answer in one short sentence and name the main colour you see. "
MAX_GREEDY_TOKENS = 12
IMAGES = [image(30 + i, w, h) for i, (w, h) in enumerate([(90, 60), (60, 90), (120, 120), (200, 150)])]
VIDEO = frames(40, 3, 70, 56)


def prompts() -> list[dict]:
    """Distinct prompts: a shared system text, then images (some shared between prompts), a video, or text."""
    def item(text: str, images=(), videos=()) -> dict:
        mm = {k: list(v) for k, v in (("image", images), ("video", videos)) if v}
        return {"prompt": chat(SYSTEM + text), **({"multi_modal_data": mm} if mm else {})}

    return [
        item(f"{IMAGE_PLACEHOLDER}What is this?", [IMAGES[0]]),
        item(f"{IMAGE_PLACEHOLDER}What is this?", [IMAGES[1]]),  # same text, another image
        item(f"{IMAGE_PLACEHOLDER}Which colour dominates?", [IMAGES[0]]),  # same image, another question
        item(f"{IMAGE_PLACEHOLDER} and {IMAGE_PLACEHOLDER}: what changed?", [IMAGES[2], IMAGES[0]]),
        item(f"Describe it. {IMAGE_PLACEHOLDER}", [IMAGES[3]]),
        item(f"{VIDEO_PLACEHOLDER}What happens?", videos=[VIDEO]),
        item(f"{VIDEO_PLACEHOLDER}{IMAGE_PLACEHOLDER}Where is the ball?", [IMAGES[1]], [VIDEO]),
        item("Write a caption for a photo of a red kite over a beach."),
        item("Hello!"),
    ]


def workload(seed: int, num_requests: int) -> list[tuple[int, SamplingParams]]:
    """(prompt index, params): greedy with various lengths, or seeded n=2 sampling."""
    rng = random.Random(seed)
    num_prompts = len(prompts())
    out = []
    for _ in range(num_requests):
        index = rng.randrange(num_prompts)
        if rng.random() < 0.75:
            params = SamplingParams(temperature=0.0, max_tokens=rng.randint(1, MAX_GREEDY_TOKENS), ignore_eos=True)
        else:
            params = SamplingParams(n=2, temperature=1.0, top_p=0.9, seed=rng.randrange(4), max_tokens=6,
                                    ignore_eos=True)
        out.append((index, params))
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen_soak"), seed=0))


@pytest.fixture(scope="module")
def alone(ckpt):
    """What each (prompt, params) gives on its own, on an engine with room for everything: ids per choice."""
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=256, enable_prefix_caching=False)
    memo: dict[tuple, list[tuple[int, ...]]] = {}

    def get(index: int, params: SamplingParams) -> list[tuple[int, ...]]:
        if params.temperature == 0.0:  # greedy: a shorter run is a prefix of the longest, run once
            params, length = SamplingParams(temperature=0.0, max_tokens=MAX_GREEDY_TOKENS, ignore_eos=True), \
                params.max_tokens
        else:
            length = params.max_tokens
        key = (index, params.temperature, params.seed, params.n)
        if key not in memo:
            out = llm.generate(prompts()[index], params, use_tqdm=False)[0]
            memo[key] = [tuple(c.token_ids) for c in out.outputs]
        return [ids[:length] for ids in memo[key]]

    return get


def check(outputs, requests, alone) -> None:
    for output, (index, params) in zip(outputs, requests):
        got = [tuple(c.token_ids) for c in sorted(output.outputs, key=lambda c: c.index)]
        assert got == alone(index, params), (output.request_id, index, params)


def test_mixed_load_with_preemption_prefix_hits_and_aborts_is_exact_and_leaks_nothing(ckpt, alone):
    # 47 usable blocks of 4 tokens (188 tokens) for up to 6 running requests of 60 to 110 tokens each
    budget = 24
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=128, num_kv_blocks=48, max_num_seqs=6,
              max_num_batched_tokens=budget)
    engine = llm.llm_engine
    features = [f for prompt in prompts()
                for f in engine.input_processor.process("probe", prompt, SamplingParams(max_tokens=1)).mm_features]
    assert max(f.length for f in features) > budget  # an image spans two prefill chunks or more
    scheduler = engine.scheduler
    kv = scheduler.kv_cache_manager

    # wave 1: everything at once
    requests = workload(seed=0, num_requests=40)
    outputs = llm.generate([prompts()[i] for i, _ in requests], [p for _, p in requests], use_tqdm=False)
    check(outputs, requests, alone)
    assert scheduler.num_preemptions > 0, "the KV pool was meant to be too small"
    assert kv.prefix_cache_hits > 0, "requests share a system prompt and images"
    assert kv.num_free_blocks == kv.num_usable_blocks

    # wave 2: three arrivals per step while others run; every fifth request aborted once it has run a while
    requests = workload(seed=1, num_requests=40)
    pending = [(f"w2-{i}", index, params) for i, (index, params) in enumerate(requests)]
    added, finished, aborted = [], {}, set()
    while pending or engine.has_unfinished_requests():
        for request_id, index, params in pending[:3]:
            engine.add_request(request_id, prompts()[index], params)
            added.append(request_id)
        del pending[:3]
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
        victims = [rid for rid in added[:-6:5] if rid not in finished and rid not in aborted]  # 2+ steps in
        engine.abort_request(victims)
        aborted.update(victims)
    assert aborted and len(finished) + len(aborted) == len(requests)
    done = [i for i in range(len(requests)) if f"w2-{i}" in finished]
    check([finished[f"w2-{i}"] for i in done], [requests[i] for i in done], alone)

    assert not engine.has_unfinished_requests()
    assert not scheduler.running and not scheduler.waiting
    assert kv.num_free_blocks == kv.num_usable_blocks
    assert llm.reset_prefix_cache()  # possible only when no request holds a block

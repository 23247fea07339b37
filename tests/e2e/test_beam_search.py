"""LLM.beam_search against transformers' generate(num_beams=k, do_sample=False) on the tiny BLIP-2 and Qwen2.5-VL
checkpoints: the same sequences, best first, and scores (sequences_scores) within 1e-4 in float32, for k = 1, 3, 5,
several length penalties and every early_stopping rule, with an EOS that some beams reach and others do not.

The EOS token is chosen from transformers' own beams (a token in the middle of the best beam but not in every
beam), written into a copy of the checkpoint's config, and given to both sides. Small KV blocks (4 tokens) make
most forks copy a partial block; every block comes back to the pool afterwards.
"""
from __future__ import annotations

import pytest
import torch

from fovea import LLM, BeamSearchParams
from tests.e2e.beam_cases import MAX_TOKENS, check, hf_beams, pick_eos, record_steps, with_eos
from tests.e2e.blip2_cases import make_image
from tests.e2e.qwen_cases import Case, chat, image, reference_inputs
from tests.oracle.blip2 import build_tiny_blip2, hf_inputs, load_hf
from tests.oracle.qwen2_5_vl import IMAGE_PLACEHOLDER, build_tiny_qwen2_5_vl, hf_model, mm_token_type_ids


# ---- BLIP-2 ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    base = build_tiny_blip2(tmp_path_factory.mktemp("beam_blip2") / "base", seed=0)
    cases = [("a photo of", make_image(100, (30, 30))), ("Question: what is it? Answer:", make_image(101, (64, 48))),
             ("describe", None)]

    def generate_fn(ckpt, prompt, img):
        model, _ = load_hf(ckpt)
        inputs = hf_inputs(ckpt, prompt, img)
        if img is None:
            return lambda config: model.language_model.generate(input_ids=inputs["input_ids"], generation_config=config), inputs["input_ids"].shape[1]
        return lambda config: model.generate(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
                                             generation_config=config), inputs["input_ids"].shape[1]

    gen, prompt_len = generate_fn(str(base), *cases[0])
    pad = load_hf(str(base))[0].config.text_config.pad_token_id
    eos = pick_eos(hf_beams(gen, prompt_len, pad, 5, None))
    ckpt = with_eos(base, base.parent / "with_eos", eos)
    generates = [generate_fn(ckpt, p, img) for p, img in cases]
    prompts = [{"prompt": p, "multi_modal_data": {"image": img}} if img is not None else p for p, img in cases]
    return ckpt, prompts, [g for g, _ in generates], [n for _, n in generates], pad, eos


def test_blip2_beam_search_matches_transformers(blip2):
    ckpt, prompts, generates, prompt_lens, pad, eos = blip2
    llm = LLM(ckpt, dtype="float32", block_size=4, num_kv_blocks=400)
    reasons: set = set()
    check(llm, prompts, generates, prompt_lens, pad, eos, reasons)
    assert reasons == {"stop", "length"}  # EOS reached by some beams and not others


# ---- Qwen2.5-VL ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    base = build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("beam_qwen") / "base", seed=0)
    cases = [Case("image", chat(f"{IMAGE_PLACEHOLDER}What is in this image?"), [image(0, 200, 150)]),
             Case("two images", chat(f"First {IMAGE_PLACEHOLDER} then {IMAGE_PLACEHOLDER}: what changed?"),
                  [image(5, 90, 60), image(6, 120, 200)]),
             Case("text only", chat("Hello world! Write a short caption."))]

    def generate_fn(ckpt, case):
        ids, mm = reference_inputs(ckpt, case)
        model = hf_model(ckpt)
        ids = ids.view(1, -1)
        kwargs = {k: v for k, v in mm.items() if v is not None}
        kwargs["mm_token_type_ids"] = mm_token_type_ids(ckpt, ids)
        return (lambda config: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                              generation_config=config, **kwargs)), ids.shape[1]

    gen, prompt_len = generate_fn(str(base), cases[0])
    pad = hf_model(str(base)).config.get_text_config().pad_token_id
    eos = pick_eos(hf_beams(gen, prompt_len, pad, 5, None))
    ckpt = with_eos(base, base.parent / "with_eos", eos)
    generates = [generate_fn(ckpt, c) for c in cases]
    return ckpt, [c.prompt_dict() for c in cases], [g for g, _ in generates], [n for _, n in generates], pad, eos


def test_qwen_beam_search_matches_transformers(qwen):
    ckpt, prompts, generates, prompt_lens, pad, eos = qwen
    llm = LLM(ckpt, dtype="float32", block_size=4, num_kv_blocks=600)
    reasons: set = set()
    check(llm, prompts, generates, prompt_lens, pad, eos, reasons)
    assert reasons == {"stop", "length"}


def test_beams_fork_the_prompt_kv_instead_of_recomputing_it(blip2):
    """The prompt (and its image) is computed once and every later sequence computes one token; a pool that could
    deadlock is refused up front, one just large enough gives the same beams."""
    ckpt, prompts, generates, prompt_lens, pad, eos = blip2
    params = BeamSearchParams(beam_width=5, max_tokens=MAX_TOKENS)
    reference = LLM(ckpt, dtype="float32", block_size=4, num_kv_blocks=400).beam_search(prompts[:1], params)
    # 13 prompt tokens: 3 full blocks, then 2 * 5 sequences of at most ceil((1 + 7) / 4) = 2 own blocks each
    with pytest.raises(ValueError, match="may hold 23 KV blocks at once, more than the pool's 22"):
        LLM(ckpt, dtype="float32", block_size=4, num_kv_blocks=23).beam_search(prompts[:1], params)
    llm = LLM(ckpt, dtype="float32", block_size=4, num_kv_blocks=24)
    steps = record_steps(llm)
    outs = llm.beam_search(prompts[:1], params)
    assert [s.tokens for s in outs[0].sequences] == [s.tokens for s in reference[0].sequences]
    scheduled = [n for out in steps for n in out.num_scheduled_tokens.values()]
    assert scheduled[0] == prompt_lens[0] and set(scheduled[1:]) == {1}
    assert sum(len(v) for out in steps for v in out.scheduled_encoder_inputs.values()) == 1
    assert any(out.blocks_to_copy for out in steps)


def test_bad_params_and_prompts_are_refused_by_name(blip2):
    ckpt, prompts, *_ = blip2
    for kwargs, match in [(dict(temperature=0.7), "temperature must be 0"), (dict(beam_width=0), "beam_width"),
                          (dict(early_stopping="soon"), "early_stopping must be"),
                          (dict(length_penalty=float("nan")), "length_penalty")]:
        with pytest.raises(ValueError, match=match):
            BeamSearchParams(**{"beam_width": 2, "max_tokens": 3, **kwargs})
    llm = LLM(ckpt, dtype="float32", block_size=4, num_kv_blocks=400)
    params = BeamSearchParams(beam_width=3, max_tokens=3)
    with pytest.raises(ValueError, match="prompt 1: .*token id"):
        llm.beam_search([prompts[0], [5, 10 ** 6]], params)
    assert not llm.llm_engine.scheduler.has_unfinished_requests()
    assert len(llm.beam_search(prompts[:1], params)[0].sequences) == 3  # the engine is clean for the next call


def test_more_prompts_than_the_pool_holds_at_once_run_in_turn(blip2):
    ckpt, prompts, *_ = blip2
    params = BeamSearchParams(beam_width=5, max_tokens=MAX_TOKENS)
    many = [prompts[i % 2] for i in range(6)]
    reference = LLM(ckpt, dtype="float32", block_size=4, num_kv_blocks=400).beam_search(many, params)
    llm = LLM(ckpt, dtype="float32", block_size=4, num_kv_blocks=50)  # room for two searches at a time
    outs = llm.beam_search(many, params)
    assert [[s.tokens for s in o.sequences] for o in outs] == [[s.tokens for s in o.sequences] for o in reference]
    assert llm.llm_engine.scheduler.kv_cache_manager.num_free_blocks == 49

"""LLM.beam_search on encoder-decoder checkpoints (BLIP-2 and InstructBLIP over Flan-T5, T5 text-only) against
transformers' generate(num_beams=k, do_sample=False): the same sequences, best first, and scores within 1e-4 in
float32, for k = 1, 3, 5 and every length-penalty / early-stopping setting of the decoder-only tests
(tests/e2e/beam_cases.py), with an EOS that some beams reach and others do not.

The decoder side is what is searched: a sequence's tokens are [decoder_start_token_id] + generated, as
transformers' `sequences`. The encoder runs once per prompt and every beam reads the same cross blocks.
"""
from __future__ import annotations

import pytest

from fovea import LLM, BeamSearchParams
from tests.e2e.beam_cases import MAX_TOKENS, check, hf_beams, pick_eos, record_steps, with_eos
from tests.e2e.blip2_cases import make_image
from tests.oracle.t5 import build_tiny_blip2_t5, build_tiny_instructblip_t5, build_tiny_t5, load_hf

START = 0  # T5's decoder_start_token_id (<pad>); transformers' sequences begin with it
PAD = 0


def _started(config):
    config.decoder_start_token_id = START
    return config


def _generate_fn(ckpt: str, prompt: str, img):
    model, processor = load_hf(ckpt)
    if img is None:
        tokenizer = getattr(processor, "tokenizer", processor)
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        lm = getattr(model, "language_model", model)
        return lambda config: lm.generate(input_ids=ids, generation_config=_started(config))
    inputs = dict(processor(images=img, text=prompt, return_tensors="pt"))
    return lambda config: model.generate(**inputs, generation_config=_started(config))


def _setup(base, cases):
    """The checkpoint with an EOS picked from transformers' own 5 beams on the first case, and each case's
    generate function and fovea prompt."""
    eos = pick_eos(hf_beams(_generate_fn(str(base), *cases[0]), 1, PAD, 5, None))
    ckpt = with_eos(base, base.parent / "with_eos", eos)
    generates = [_generate_fn(ckpt, p, img) for p, img in cases]
    prompts = [{"prompt": p, "multi_modal_data": {"image": img}} if img is not None else p for p, img in cases]
    return ckpt, prompts, generates, eos


@pytest.fixture(scope="module")
def blip2_t5(tmp_path_factory):
    base = build_tiny_blip2_t5(tmp_path_factory.mktemp("beam_blip2_t5") / "base", seed=4)
    cases = [("a photo of", make_image(100, (30, 30))), ("Question: what is it? Answer:", make_image(101, (64, 48))),
             ("", make_image(102, (17, 95)))]
    return _setup(base, cases)


def test_blip2_t5_beam_search_matches_transformers(blip2_t5):
    ckpt, prompts, generates, eos = blip2_t5
    llm = LLM(ckpt, dtype="float32", block_size=4, num_kv_blocks=400)
    reasons: set = set()
    check(llm, prompts, generates, [1] * len(prompts), PAD, eos, reasons)
    assert reasons == {"stop", "length"}  # EOS reached by some beams and not others


def test_instructblip_t5_and_t5_text_beam_search_match_transformers(tmp_path_factory):
    root = tmp_path_factory.mktemp("beam_t5_more")
    for base, cases in [
        (build_tiny_instructblip_t5(root / "instructblip" / "base", seed=3),
         [("Question: what is it? Answer:", make_image(103, (40, 30))), ("describe", make_image(104, (30, 50)))]),
        (build_tiny_t5(root / "t5" / "base", seed=3, hub_form="flan"),
         [("A photo of a cat sitting on a window sill", None), ("Hello world!", None)]),
    ]:
        ckpt, prompts, generates, eos = _setup(base, cases)
        llm = LLM(ckpt, dtype="float32", block_size=4, num_kv_blocks=400)
        check(llm, prompts, generates, [1] * len(prompts), PAD, eos, set())


def test_beams_share_the_encoder_output_instead_of_recomputing_it(blip2_t5):
    """The encoder (and the image) runs once per prompt, every fork reads its root's cross blocks and computes
    one decoder token; the encoder's prompt is what the output reports."""
    ckpt, prompts, *_ = blip2_t5
    params = BeamSearchParams(beam_width=5, max_tokens=MAX_TOKENS)
    llm = LLM(ckpt, dtype="float32", block_size=4, num_kv_blocks=400)
    steps = record_steps(llm)
    results = llm.beam_search(prompts[:1], params)
    assert len(results[0].sequences) == 5 and all(s.tokens[0] == START for s in results[0].sequences)
    assert len([r for s in steps for r in s.scheduled_encoder_prompts]) == 1  # the root's, once
    assert sum(len(v) for s in steps for v in s.scheduled_encoder_inputs.values()) == 1  # the image, once
    root_cross = steps[0].scheduled_new_reqs[0].cross_block_ids
    forks = [d for s in steps[1:] for d in s.scheduled_new_reqs]
    assert root_cross and len(forks) >= 5 and all(d.cross_block_ids == root_cross for d in forks)
    assert set(n for s in steps[1:] for n in s.num_scheduled_tokens.values()) == {1}
    assert any(s.blocks_to_copy for s in steps)
    kv = llm.llm_engine.scheduler.kv_cache_manager
    assert kv.num_free_blocks == kv.num_usable_blocks

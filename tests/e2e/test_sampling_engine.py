"""vLLM sampling semantics through the whole engine: seeds, n, stops, min_tokens, EOS, output shape."""
from __future__ import annotations

import pytest

from fovea import LLM, SamplingParams
from tests.e2e.blip2_cases import cases, make_image
from tests.oracle.blip2 import build_tiny_blip2, hf_reference


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = build_tiny_blip2(tmp_path_factory.mktemp("blip2_sampling"), seed=0)
    return path, LLM(path, dtype="float32", block_size=4)


def _prompt(i=0):
    prompt, img, _ = cases(8)[i]
    return {"prompt": prompt, "multi_modal_data": {"image": img}}


def test_seeded_request_same_alone_and_in_any_batch(setup):
    _, llm = setup
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate(_prompt(0), seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=m, ignore_eos=True) for m in (3, 9, 5)]
    batch = [_prompt(1), _prompt(2), _prompt(0), _prompt(3)]
    outs = llm.generate(batch, [others[0], others[1], seeded, others[2]], use_tqdm=False)
    assert outs[2].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=12, ignore_eos=True)
    assert llm.generate(_prompt(0), other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_n_with_seed_gives_reproducible_distinct_choices(setup):
    _, llm = setup
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    first = llm.generate(_prompt(1), params, use_tqdm=False)[0]
    second = llm.generate(_prompt(1), params, use_tqdm=False)[0]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in second.outputs]
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1


def test_stop_token_ids_and_stop_strings(setup):
    path, llm = setup
    prompt, img, _ = cases(8)[0]
    ref_ids, _ = hf_reference(path, prompt, img, 12)
    tok = llm.get_tokenizer()
    # stop at the 4th generated token: it is kept in token_ids, its text left out, stop_reason names it
    stop_id = ref_ids[3]
    first_hit = ref_ids.index(stop_id)
    out = llm.generate(_prompt(0), SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_id]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref_ids[:first_hit + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    # a stop string: the text ends right before it
    full_text = tok.decode(ref_ids, skip_special_tokens=True)
    stop = full_text[len(full_text) // 2: len(full_text) // 2 + 3]
    out = llm.generate(_prompt(0), SamplingParams(temperature=0.0, max_tokens=12, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full_text[:full_text.index(stop)]
    kept = llm.generate(_prompt(0), SamplingParams(temperature=0.0, max_tokens=12, stop=[stop],
                                                   include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == full_text[:full_text.index(stop) + len(stop)]


def test_eos_min_tokens_and_ignore_eos(setup):
    path, llm = setup
    prompt, img, _ = cases(8)[0]
    ref_ids, _ = hf_reference(path, prompt, img, 12)
    engine = llm.llm_engine
    # pretend the 3rd generated token is EOS: generation stops there unless ignore_eos or min_tokens say otherwise
    eos = ref_ids[2]
    first_hit = ref_ids.index(eos)
    saved = engine.input_processor.eos_token_id
    engine.input_processor.eos_token_id = eos
    try:
        out = llm.generate(_prompt(0), SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)[0].outputs[0]
        assert out.token_ids == ref_ids[:first_hit + 1] and out.finish_reason == "stop" and out.stop_reason is None
        out = llm.generate(_prompt(0), SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
        assert out.token_ids == ref_ids and out.finish_reason == "length"
        out = llm.generate(_prompt(0), SamplingParams(temperature=0.0, max_tokens=12, min_tokens=first_hit + 2),
                           use_tqdm=False)[0].outputs[0]
        assert eos not in out.token_ids[:first_hit + 2] and len(out.token_ids) >= first_hit + 2
    finally:
        engine.input_processor.eos_token_id = saved


def test_request_output_shape(setup):
    _, llm = setup
    outs = llm.generate([_prompt(0), "plain text prompt"], SamplingParams(temperature=0.0, max_tokens=4, logprobs=2,
                                                                          ignore_eos=True), use_tqdm=False)
    for out in outs:
        assert out.finished
        assert out.prompt_token_ids and isinstance(out.prompt_token_ids[0], int)
        c = out.outputs[0]
        assert c.index == 0 and len(c.token_ids) == 4 and len(c.logprobs) == 4
        assert all(len(entry) >= 2 and c.token_ids[i] in entry for i, entry in enumerate(c.logprobs))
        assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for e, t in zip(c.logprobs, c.token_ids)))
    assert outs[0].prompt.startswith("Question")
    assert outs[1].prompt == "plain text prompt"


def test_tqdm_bar_is_on_by_default(setup, capsys):
    _, llm = setup
    llm.generate(_prompt(0), SamplingParams(max_tokens=2))
    assert "Processed prompts" in capsys.readouterr().err

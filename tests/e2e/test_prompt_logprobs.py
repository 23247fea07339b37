"""SamplingParams.prompt_logprobs against transformers' logits over the prompt (log_softmax, float32, 1e-4) on the
tiny BLIP-2 and Qwen2.5-VL checkpoints: every prompt token after the first gets its own logprob, rank and the top-k;
the first token and image placeholders get None (as vLLM). Chunked prefill (chunks splitting the image) gives the
same values; a second identical request, which could hit the prefix cache, still gets all of them."""
from __future__ import annotations

import pytest
import torch

from fovea import LLM, SamplingParams
from tests.e2e.blip2_cases import make_image
from tests.e2e.qwen_cases import Case, chat, image, reference_inputs
from tests.oracle.blip2 import build_tiny_blip2, hf_inputs, load_hf
from tests.oracle.qwen2_5_vl import IMAGE_PLACEHOLDER, build_tiny_qwen2_5_vl, hf_model, mm_token_type_ids

ATOL = 1e-4
TOP = 3


def check(out, ids: list[int], logits: torch.Tensor, placeholder: int) -> None:
    """`out`'s prompt logprobs vs transformers' logits [L, V] over prompt `ids`."""
    assert out.prompt_token_ids == ids
    got = out.prompt_logprobs
    assert len(got) == len(ids) and got[0] is None
    want = torch.log_softmax(logits.float(), dim=-1)
    for i in range(1, len(ids)):
        if ids[i] == placeholder:
            assert got[i] is None, i
            continue
        row, token = want[i - 1], ids[i]
        entry = got[i]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=ATOL), i
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        top = row.topk(TOP)
        for value, tid in zip(top.values.tolist(), top.indices.tolist()):
            assert entry[tid].logprob == pytest.approx(value, abs=ATOL)
        assert set(entry) == {token, *top.indices.tolist()}
        assert entry[token].decoded_token is not None


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    ckpt = str(build_tiny_blip2(tmp_path_factory.mktemp("plp_blip2"), seed=0))
    model, _ = load_hf(ckpt)
    cases = [("Question: what colour is the large shape? Answer:", make_image(3, (64, 48))), ("a photo of", None)]
    refs = []
    with torch.no_grad():
        for prompt, img in cases:
            inputs = hf_inputs(ckpt, prompt, img)
            if img is None:
                logits = model.language_model(input_ids=inputs["input_ids"]).logits[0]
            else:
                logits = model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"]).logits[0]
            refs.append((inputs["input_ids"][0].tolist(), logits))
    prompts = [{"prompt": p, "multi_modal_data": {"image": img}} if img is not None else p for p, img in cases]
    return ckpt, prompts, refs, model.config.image_token_index


@pytest.mark.parametrize("chunk", [None, 5])
def test_blip2_prompt_logprobs_match_transformers(blip2, chunk):
    ckpt, prompts, refs, placeholder = blip2
    kwargs = dict(max_num_batched_tokens=chunk, enable_chunked_prefill=True) if chunk else {}
    llm = LLM(ckpt, dtype="float32", block_size=4, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=TOP)
    for _ in range(2):  # the second time every full block is in the prefix cache: the request must skip it
        outs = llm.generate(prompts, params, use_tqdm=False)
        for out, (ids, logits) in zip(outs, refs):
            check(out, ids, logits, placeholder)
            assert out.num_cached_tokens == 0
    # without prompt_logprobs the same prompt does hit the cache (so the test above could have lost them)
    out = llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)[0]
    assert out.num_cached_tokens > 0 and out.prompt_logprobs is None


def test_qwen_prompt_logprobs_match_transformers(tmp_path_factory):
    ckpt = str(build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("plp_qwen"), seed=0))
    case = Case("image", chat(f"First {IMAGE_PLACEHOLDER} then more words"), [image(0, 120, 90)])
    ids, mm = reference_inputs(ckpt, case)
    model = hf_model(ckpt)
    ids = ids.view(1, -1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm_token_type_ids(ckpt, ids),
                       **{k: v for k, v in mm.items() if v is not None}).logits[0]
    for chunk in (None, 7):
        kwargs = dict(max_num_batched_tokens=chunk) if chunk else {}
        llm = LLM(ckpt, dtype="float32", block_size=4, **kwargs)
        out = llm.generate(case.prompt_dict(), SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=TOP),
                           use_tqdm=False)[0]
        check(out, ids[0].tolist(), logits, model.config.image_token_id)


def test_prompt_logprobs_is_validated():
    with pytest.raises(ValueError, match="prompt_logprobs must be None or an integer >= 0"):
        SamplingParams(prompt_logprobs=-1)
    assert SamplingParams(prompt_logprobs=True).prompt_logprobs == 0

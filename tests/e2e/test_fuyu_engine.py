"""fovea's engine against transformers' FuyuForCausalLM (patches projected into a Persimmon LM) on tiny checkpoints.

Fuyu's placeholders are not all features: each row of `|SPEAKER|` patches ends with a `|NEWLINE|`, and `<s>`
follows the image, both keeping their token embeddings. So besides the mixed batch (images of odd sizes, one per
prompt, text only, preemption), prefill chunks are cut at every kind of boundary (inside a row of patches, right
before a newline, right after one, before `<s>`) and prefix-cache hits end inside the image; greedy ids must equal
transformers' batch-size-1 `generate` and logprobs be within 1e-4 of its raw logits (float32) everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from fovea import LLM, SamplingParams
from tests.e2e.blip2_cases import make_image
from tests.oracle.fuyu import build_tiny_fuyu, hf_reference

LOGPROBS = 3
ATOL = 1e-4


@dataclass
class Case:
    name: str
    prompt: str
    images: list = field(default_factory=list)
    max_tokens: int = 8


def cases() -> list[Case]:
    return [
        Case("wide", "What is in this image?\n", [make_image(1, (95, 47))], 10),  # 2 rows of 4 patches
        Case("tall, shrunk", "Which one is bigger?\n", [make_image(2, (17, 200))], 7),  # 5 rows of 1
        Case("large, shrunk", "Describe the image in detail.\n", [make_image(3, (400, 130))], 9),  # 3 rows of 7
        Case("one patch", "Where is the dog?", [make_image(4, (8, 5))], 12),
        Case("text only", "Hello world! Write a short caption for this photo.", [], 9),
        Case("no text", "", [make_image(5, (61, 75))], 6),
    ]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(build_tiny_fuyu(tmp_path_factory.mktemp("fuyu"), seed=3))


@pytest.fixture(scope="module")
def ckpt_variant(tmp_path_factory):
    """No q/k layernorm, a whole-head rotary (partial_rotary_factor 1), three layers, eight heads."""
    return str(build_tiny_fuyu(tmp_path_factory.mktemp("fuyu_variant"), seed=4, qk_layernorm=False,
                               partial_rotary_factor=1.0, num_layers=3, num_heads=8))


def prompt_dict(case: Case) -> dict | str:
    return {"prompt": case.prompt, "multi_modal_data": {"image": case.images}} if case.images else case.prompt


def run(llm: LLM, model_dir: str, batch: list[Case]) -> list:
    params = [SamplingParams(temperature=0.0, max_tokens=c.max_tokens, logprobs=LOGPROBS, ignore_eos=True)
              for c in batch]
    outs = llm.generate([prompt_dict(c) for c in batch], params, use_tqdm=False)
    for case, out in zip(batch, outs):
        ref_prompt, ref_ids, ref_logprobs = hf_reference(model_dir, case.prompt, case.images, case.max_tokens)
        assert out.prompt_token_ids == ref_prompt, f"{case.name}: prompt ids"
        got = out.outputs[0]
        assert got.token_ids == ref_ids, case.name
        assert got.finish_reason == "length" and len(got.logprobs) == len(ref_ids)
        for step, (entry, ref) in enumerate(zip(got.logprobs, ref_logprobs)):
            assert set(ref.topk(LOGPROBS).indices.tolist()) <= set(entry), f"{case.name}, step {step}"
            for token_id, lp in entry.items():
                err = abs(lp.logprob - ref[token_id].item())
                assert err < ATOL, f"{case.name}, step {step}, token {token_id}: logprob off by {err:.2e}"
    return outs


def test_mixed_batch_chunked_and_preempted(ckpt):
    # 7-token steps cut the images' placeholder runs (up to 25 tokens) at varying places; 20 blocks of 4 hold
    # two or three requests at a time
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=128, max_num_batched_tokens=7, num_kv_blocks=20)
    batch = cases()
    outs = run(llm, ckpt, batch)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == len(batch)  # not degenerate
    assert llm.llm_engine.scheduler.num_preemptions > 0


def _chunk_starts(prompt_len: int, chunk: int) -> set[int]:
    return set(range(chunk, prompt_len, chunk))


def test_chunk_boundaries_inside_rows_and_at_newlines(ckpt):
    """One request alone, prefilled in chunks of 3, 4 and 5 tokens: between them the chunks start inside a row of
    patches, on a newline, right after one and on the <s> after the image."""
    case = Case("3 rows of 5", "What colour is the car?\n", [make_image(6, (130, 70))], 6)
    kinds: set[str] = set()
    for chunk in (3, 4, 5):
        llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=128, max_num_batched_tokens=chunk,
                  enable_prefix_caching=False, num_kv_blocks=40)
        (out,) = run(llm, ckpt, [case])
        ids = out.prompt_token_ids
        vocab = llm.get_tokenizer().get_vocab()
        speaker, newline, bos = vocab["|SPEAKER|"], vocab["|NEWLINE|"], vocab["<s>"]
        for start in _chunk_starts(len(ids), chunk):
            if ids[start] == newline:
                kinds.add("on a newline")
            elif ids[start - 1] == newline and ids[start] == speaker:
                kinds.add("right after a newline")
            elif ids[start - 1] == speaker and ids[start] == speaker:
                kinds.add("inside a row")
            elif ids[start] == bos:
                kinds.add("on <s>")
    assert kinds == {"on a newline", "right after a newline", "inside a row", "on <s>"}


def test_prefix_cache_hits_end_inside_the_image_and_stay_exact(ckpt):
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=128, max_num_batched_tokens=16)
    image = make_image(7, (130, 70))  # 3 rows of 5: a placeholder run of 19 tokens
    first = Case("first", "What colour is the car?\n", [image], 6)
    run(llm, ckpt, [first])
    # the same image, another text: the image's full blocks (16 of its 19 tokens: a hit that ends inside the
    # last row) are shared, the rest is computed from there
    other_text = run(llm, ckpt, [Case("other text", "How many people are in the picture?\n", [image], 6)])[0]
    assert other_text.num_cached_tokens == 16
    # another image of the same size with the same text: the image comes first, so nothing is shared
    other_image = run(llm, ckpt, [Case("other image", first.prompt, [make_image(8, (130, 70))], 6)])[0]
    assert other_image.num_cached_tokens == 0
    again = run(llm, ckpt, [first])[0]
    assert again.num_cached_tokens >= len(again.prompt_token_ids) - 4


def test_variant_without_qk_layernorm_and_full_rotary(ckpt_variant):
    llm = LLM(ckpt_variant, dtype="float32", block_size=4, max_model_len=128, max_num_batched_tokens=9)
    run(llm, ckpt_variant, [c for c in cases() if c.name in ("wide", "large, shrunk", "text only")])


def test_bfloat16_stays_as_close_to_float32_as_transformers_bfloat16(ckpt):
    batch = [c for c in cases() if c.name in ("wide", "large, shrunk", "text only")]
    llm = LLM(ckpt, dtype="bfloat16", block_size=4, max_model_len=128)
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=LOGPROBS, ignore_eos=True)
    outs = llm.generate([prompt_dict(c) for c in batch], params, use_tqdm=False)
    for case, out in zip(batch, outs):
        _, _, (exact,) = hf_reference(ckpt, case.prompt, case.images, 1)
        _, _, (hf_bf16,) = hf_reference(ckpt, case.prompt, case.images, 1, dtype=torch.bfloat16)
        entry = out.outputs[0].logprobs[0]
        ours = max(abs(entry[t].logprob - exact[t].item()) for t in entry)
        theirs = max(abs(hf_bf16[t].item() - exact[t].item()) for t in entry)
        assert ours <= 3 * theirs + 0.02, f"{case.name}: fovea bf16 off by {ours:.3f}, transformers bf16 {theirs:.3f}"


def test_chat_uses_the_fallback_template(ckpt):
    """The checkpoint has no chat template (adept's has none): vLLM's Fuyu fallback puts each turn's text on its own
    line, and fovea's processor frames it with the image as FuyuProcessor frames that text."""
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=128)
    image = make_image(9, (90, 70))
    messages = [{"role": "user", "content": [{"type": "image_pil", "image_pil": image},
                                             {"type": "text", "text": "Write a short caption for this photo."}]}]
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    assert out.prompt == "Write a short caption for this photo.\n"
    ref_prompt, ref_ids, _ = hf_reference(ckpt, out.prompt, [image], 8)
    assert out.prompt_token_ids == ref_prompt
    assert out.outputs[0].token_ids == ref_ids


@pytest.mark.parametrize("prompt,num_images,match", [
    ("two images", 2, r"2 image item\(s\) given but at most 1 per prompt are allowed"),
    ("|SPEAKER| a placeholder", 1, r"holds 1 \|SPEAKER\| image token\(s\) \(id \d+\) that no image fills"),
    ("|SPEAKER||SPEAKER| and no image", 0, r"holds 2 \|SPEAKER\| image token\(s\)"),
])
def test_placeholders_and_images_must_match(ckpt, prompt, num_images, match):
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=128)
    images = [make_image(i, (20, 20)) for i in range(num_images)]
    request = {"prompt": prompt, "multi_modal_data": {"image": images}} if images else prompt
    with pytest.raises(ValueError, match=match):
        llm.generate(request, SamplingParams(max_tokens=2), use_tqdm=False)
    good = llm.generate({"prompt": "ok", "multi_modal_data": {"image": make_image(0, (20, 20))}},
                        SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert len(good[0].outputs[0].token_ids) == 2

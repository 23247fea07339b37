"""fovea's engine against transformers' FuyuForCausalLM (patches projected into a Persimmon LM) on tiny checkpoints.

Fuyu's placeholders are not all features: each row of `|SPEAKER|` patches ends with a `|NEWLINE|`, and `<s>`
follows the image, both keeping their token embeddings. So besides the mixed batch (images of odd sizes, one per
prompt, text only, preemption), prefill chunks are cut at every kind of boundary (inside a row of patches, right
before a newline, right after one, before `<s>`) and prefix-cache hits end inside the image; greedy ids must equal
transformers' batch-size-1 `generate` and logprobs be within 1e-4 of its raw logits (float32) everywhere.
"""
from __future__ import annotations

import pytest

from fovea import LLM
from tests.e2e.blip2_cases import make_image
from tests.e2e.llava_cases import Case, check_bfloat16_close, check_chat, check_placeholder_mismatch, run
from tests.oracle import fuyu as oracle
from tests.oracle.fuyu import build_tiny_fuyu


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


def test_mixed_batch_chunked_and_preempted(ckpt):
    # 7-token steps cut the images' placeholder runs (up to 25 tokens) at varying places; 20 blocks of 4 hold
    # two or three requests at a time
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=128, max_num_batched_tokens=7, num_kv_blocks=20)
    batch = cases()
    outs = run(llm, ckpt, batch, oracle)
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
        (out,) = run(llm, ckpt, [case], oracle)
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
    run(llm, ckpt, [first], oracle)
    # the same image, another text: the image's full blocks (16 of its 19 tokens: a hit that ends inside the
    # last row) are shared, the rest is computed from there
    other_text = run(llm, ckpt, [Case("other text", "How many people are in the picture?\n", [image], 6)], oracle)[0]
    assert other_text.num_cached_tokens == 16
    # another image of the same size with the same text: the image comes first, so nothing is shared
    other_image = run(llm, ckpt, [Case("other image", first.prompt, [make_image(8, (130, 70))], 6)], oracle)[0]
    assert other_image.num_cached_tokens == 0
    again = run(llm, ckpt, [first], oracle)[0]
    assert again.num_cached_tokens >= len(again.prompt_token_ids) - 4


def test_variant_without_qk_layernorm_and_full_rotary(ckpt_variant):
    llm = LLM(ckpt_variant, dtype="float32", block_size=4, max_model_len=128, max_num_batched_tokens=9)
    run(llm, ckpt_variant, [c for c in cases() if c.name in ("wide", "large, shrunk", "text only")], oracle)


def test_bfloat16_stays_as_close_to_float32_as_transformers_bfloat16(ckpt):
    llm = LLM(ckpt, dtype="bfloat16", block_size=4, max_model_len=128)
    check_bfloat16_close(llm, ckpt, [c for c in cases() if c.name in ("wide", "large, shrunk", "text only")], oracle)


def test_chat_uses_the_fallback_template(ckpt):
    """The checkpoint has no chat template (adept's has none): vLLM's Fuyu fallback puts each turn's text on its own
    line, and fovea's processor frames it with the image as FuyuProcessor frames that text."""
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=128)
    text = "Write a short caption for this photo."
    check_chat(llm, ckpt, text, text + "\n", text + "\n", oracle)


@pytest.mark.parametrize("prompt,num_images,match", [
    ("two images", 2, r"2 image item\(s\) given but at most 1 per prompt are allowed"),
    ("|SPEAKER| a placeholder", 1, r"holds 1 \|SPEAKER\| image token\(s\) \(id \d+\) that no image fills"),
    ("|SPEAKER||SPEAKER| and no image", 0, r"holds 2 \|SPEAKER\| image token\(s\)"),
])
def test_placeholders_and_images_must_match(ckpt, prompt, num_images, match):
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=128)
    check_placeholder_mismatch(llm, prompt, num_images, match, "ok", (20, 20))

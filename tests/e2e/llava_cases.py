"""What the engine tests of LLaVA-1.5, LLaVA-NeXT and Fuyu share: a request case, the run of a batch checked against
a transformers oracle, and the checks every image model's test makes the same way (bfloat16 closeness, chat with the
checkpoint's template, placeholders that do not match the images).

`oracle` is a tests.oracle module (`llava`, `llava_next`, `fuyu`) with `hf_reference(model_dir, prompt, images,
max_tokens, dtype=...) -> (prompt ids, greedy ids, [raw logits per step])` and, for cases `as_embeds`,
`hf_image_embeds(model_dir, image)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import pytest
import torch

from fovea import LLM, SamplingParams
from tests.e2e.blip2_cases import make_image

LOGPROBS = 3
ATOL = 1e-4


@dataclass
class Case:
    name: str
    prompt: str
    images: list = field(default_factory=list)
    max_tokens: int = 8
    as_embeds: bool = False  # give the images as transformers' projector outputs instead of pixels


def prompt_dict(model_dir: str, case: Case, oracle: ModuleType) -> dict:
    if not case.images:
        return {"prompt": case.prompt}
    images = [oracle.hf_image_embeds(model_dir, im) for im in case.images] if case.as_embeds else case.images
    return {"prompt": case.prompt, "multi_modal_data": {"image": images}}


def run(llm: LLM, model_dir: str, batch: list[Case], oracle: ModuleType) -> list:
    """`batch` through `llm.generate` at once, each output checked against `oracle`'s transformers reference:
    prompt ids, greedy ids, logprobs within ATOL."""
    params = [SamplingParams(temperature=0.0, max_tokens=c.max_tokens, logprobs=LOGPROBS, ignore_eos=True)
              for c in batch]
    outs = llm.generate([prompt_dict(model_dir, c, oracle) for c in batch], params, use_tqdm=False)
    for case, out in zip(batch, outs):
        ref_prompt, ref_ids, ref_logprobs = oracle.hf_reference(model_dir, case.prompt, case.images, case.max_tokens)
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


def check_bfloat16_close(llm: LLM, model_dir: str, batch: list[Case], oracle: ModuleType) -> None:
    """bfloat16 runs other kernels than float32: fovea's first-step logprobs (`llm` in bfloat16) must be no further
    from transformers' float32 ones than transformers' own bfloat16 model is (up to a factor for summation orders)."""
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=LOGPROBS, ignore_eos=True)
    outs = llm.generate([prompt_dict(model_dir, c, oracle) for c in batch], params, use_tqdm=False)
    for case, out in zip(batch, outs):
        _, _, (exact,) = oracle.hf_reference(model_dir, case.prompt, case.images, 1)
        _, _, (hf_bf16,) = oracle.hf_reference(model_dir, case.prompt, case.images, 1, dtype=torch.bfloat16)
        entry = out.outputs[0].logprobs[0]
        ours = max(abs(entry[t].logprob - exact[t].item()) for t in entry)
        theirs = max(abs(hf_bf16[t].item() - exact[t].item()) for t in entry)
        assert ours <= 3 * theirs + 0.02, f"{case.name}: fovea bf16 off by {ours:.3f}, transformers bf16 {theirs:.3f}"


def check_chat(llm: LLM, model_dir: str, text: str, expected_prompt: str, hf_prompt: str, oracle: ModuleType) -> None:
    """`LLM.chat` of one image and `text` renders `expected_prompt` (the checkpoint's template, or the fallback) and
    gives the prompt ids and greedy ids of transformers' processor on `hf_prompt` (the same text, less any BOS that
    its processor adds itself)."""
    image = make_image(9, (90, 70))
    messages = [{"role": "user", "content": [{"type": "image_pil", "image_pil": image},
                                             {"type": "text", "text": text}]}]
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    assert out.prompt == expected_prompt
    ref_prompt, ref_ids, _ = oracle.hf_reference(model_dir, hf_prompt, [image], 8)
    assert out.prompt_token_ids == ref_prompt
    assert out.outputs[0].token_ids == ref_ids


def check_placeholder_mismatch(llm: LLM, prompt: str, num_images: int, match: str, good_prompt: str,
                               image_size: tuple[int, int]) -> None:
    """A prompt whose placeholders do not match its images is a ValueError matching `match`; the engine is unharmed:
    a good request (`good_prompt` with one image) still runs."""
    images = [make_image(i, image_size) for i in range(num_images)]
    request = {"prompt": prompt, "multi_modal_data": {"image": images}} if images else prompt
    with pytest.raises(ValueError, match=match):
        llm.generate(request, SamplingParams(max_tokens=2), use_tqdm=False)
    good = {"prompt": good_prompt, "multi_modal_data": {"image": make_image(0, image_size)}}
    out = llm.generate(good, SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2

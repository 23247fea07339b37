"""LoRA on BLIP-2's OPT language model: two PEFT adapters and the base model, with images, in one batch, equal to
transformers' BLIP-2 with each adapter merged by PEFT (greedy ids, logprobs within 1e-4, float32). Adapters
reach the OPT decoder only: one that also names the vision tower's fc1 is refused."""
from __future__ import annotations

import pytest

from fovea import LLM, LoRARequest, SamplingParams
from tests.e2e.blip2_cases import cases
from tests.lora.adapters import make_peft_adapter, merged_checkpoint
from tests.oracle.blip2 import build_tiny_blip2, hf_reference

LOGPROBS = 3
LM = r"language_model\.model\.decoder\.layers\.\d+\."


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_blip2")
    base = build_tiny_blip2(root / "base", seed=0, init_gain=2.0)
    one = make_peft_adapter(base, root / "one", target_modules=LM + r"(self_attn\.(q_proj|v_proj)|fc1)", r=4,
                            lora_alpha=8, seed=11)
    two = make_peft_adapter(base, root / "two", target_modules=LM + r"(self_attn\.(k_proj|out_proj)|fc2)", r=6,
                            lora_alpha=12, use_rslora=True, seed=12)
    refs = {None: base, "one": merged_checkpoint(base, one, root / "one_merged"),
            "two": merged_checkpoint(base, two, root / "two_merged")}
    loras = {None: None, "one": LoRARequest("one", 1, str(one)), "two": LoRARequest("two", 2, str(two))}
    return base, refs, loras


def test_adapters_and_base_with_images_in_one_batch_match_peft(setup):
    base, refs, loras = setup
    llm = LLM(str(base), dtype="float32", block_size=4, enable_lora=True, max_loras=2, max_lora_rank=8)
    batch = cases(6)
    names = [None, "one", "two"] * 2
    params = [SamplingParams(temperature=0.0, max_tokens=m, logprobs=LOGPROBS, ignore_eos=True) for _, _, m in batch]
    prompts = [{"prompt": p, "multi_modal_data": {"image": img}} for p, img, _ in batch]
    outs = llm.generate(prompts, params, lora_request=[loras[n] for n in names], use_tqdm=False)
    for (prompt, img, max_tokens), name, out in zip(batch, names, outs):
        ref_ids, ref_logprobs = hf_reference(refs[name], prompt, img, max_tokens)
        got = out.outputs[0]
        assert got.token_ids == ref_ids, (prompt, name)
        for step, (entry, ref) in enumerate(zip(got.logprobs, ref_logprobs)):
            assert set(ref.topk(LOGPROBS).indices.tolist()) <= set(entry), (name, step)
            for token_id, lp in entry.items():
                assert abs(lp.logprob - ref[token_id].item()) < 1e-4, (name, step, token_id)
    # the same prompt and image under the base model and each adapter: three different continuations
    prompt, img, _ = batch[0]
    same = [{"prompt": prompt, "multi_modal_data": {"image": img}}] * 3
    outs = llm.generate(same, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                        lora_request=[loras[None], loras["one"], loras["two"]], use_tqdm=False)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 3
    model = llm.llm_engine.runner.model
    assert "lora(" in repr(model.language_model.model.decoder.layers[0].fc1)
    assert "lora(" not in repr(model.vision_model.encoder.layers[0].mlp.fc1)


def test_adapter_on_the_vision_tower_is_refused(setup, tmp_path):
    base, _, _ = setup
    tower = make_peft_adapter(base, tmp_path / "tower", target_modules=["fc1"])  # ViT's fc1 and OPT's fc1
    llm = LLM(str(base), dtype="float32", block_size=4, num_kv_blocks=64, enable_lora=True)
    with pytest.raises(ValueError, match=r"module 'vision_model\.encoder\.layers\.\d\.mlp\.fc1' is not one fovea "
                                         r"applies LoRA to; supported: the language model's q_proj"):
        llm.generate("a photo of", lora_request=LoRARequest("tower", 1, str(tower)), use_tqdm=False)


@pytest.mark.parametrize("language_model, targets", [
    ("opt", LM + r"(self_attn\.(q_proj|out_proj)|fc2)"),
    ("llama", r"language_model\.model\.layers\.\d+\.(self_attn\.(q_proj|o_proj)|mlp\.(gate_proj|down_proj))"),
])
def test_instructblip_takes_adapters_on_its_opt_or_llama(tmp_path, language_model, targets):
    from tests.oracle.instructblip import build_tiny_instructblip
    from tests.oracle.instructblip import hf_reference as instructblip_reference

    base = build_tiny_instructblip(tmp_path / "base", seed=0, language_model=language_model)
    adapter = make_peft_adapter(base, tmp_path / "lm", target_modules=targets, r=4, lora_alpha=8, seed=13)
    merged = merged_checkpoint(base, adapter, tmp_path / "merged")
    llm = LLM(str(base), dtype="float32", block_size=4, enable_lora=True)
    lora = LoRARequest("lm", 1, str(adapter))
    runs = [(prompt, img, m, on) for prompt, img, m in cases(2) for on in (True, False)]
    outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": img}} for p, img, _, _ in runs],
                        [SamplingParams(temperature=0.0, max_tokens=m, logprobs=LOGPROBS, ignore_eos=True)
                         for _, _, m, _ in runs],
                        lora_request=[lora if on else None for *_, on in runs], use_tqdm=False)
    for (prompt, img, max_tokens, on), out in zip(runs, outs):
        ref_ids, ref_logprobs = instructblip_reference(merged if on else base, prompt, img, max_tokens)
        assert out.outputs[0].token_ids == ref_ids, (prompt, on)
        for step, (entry, ref) in enumerate(zip(out.outputs[0].logprobs, ref_logprobs)):
            for token_id, lp in entry.items():
                assert abs(lp.logprob - ref[token_id].item()) < 1e-4, (prompt, on, step, token_id)
    assert any(a.outputs[0].token_ids != b.outputs[0].token_ids for a, b in zip(outs[0::2], outs[1::2]))

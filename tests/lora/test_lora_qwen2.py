"""LoRA through `LLM` on a tiny Qwen2: two PEFT adapters and the base model mixed in one batch must match
transformers with each adapter merged by PEFT (greedy ids equal, logprobs within 1e-4, float32)."""
from __future__ import annotations

import pytest
import torch

from fovea import LLM, LoRARequest, SamplingParams
from tests.lora.adapters import make_peft_adapter
from tests.oracle.qwen2_5_vl import build_qwen_tokenizer, hf_reference

LOGPROBS = 3
ATOL = 1e-4
TEXTS = ["the cat sat on the mat", "a photo of a dog", "one two three four five six seven eight nine ten",
         "hello"]


def prompt_ids() -> list[list[int]]:
    tokenizer = build_qwen_tokenizer()
    return [tokenizer(t).input_ids for t in TEXTS]


def check(out, reference_dir: str, ids: list[int], max_tokens: int) -> None:
    ref_ids, ref_logprobs = hf_reference(reference_dir, torch.tensor(ids), max_tokens)
    got = out.outputs[0]
    assert got.token_ids == ref_ids
    for step, (entry, ref) in enumerate(zip(got.logprobs, ref_logprobs)):
        assert set(ref.topk(LOGPROBS).indices.tolist()) <= set(entry), step
        for token_id, lp in entry.items():
            assert abs(lp.logprob - ref[token_id].item()) < ATOL, (step, token_id)


def test_two_adapters_and_base_in_one_batch_match_peft(setup):
    base, refs, loras = setup
    llm = LLM(str(base), dtype="float32", block_size=4, enable_lora=True, max_loras=2, max_lora_rank=8)
    ids = prompt_ids()
    names = [None, "attn", "mlp"]
    prompts, adapters, expected = [], [], []
    for i, p in enumerate(ids):
        for j, name in enumerate(names):
            prompts.append({"prompt_token_ids": p})
            adapters.append(loras[name])
            expected.append((name, p, 6 + (i + j) % 4))
    params = [SamplingParams(temperature=0.0, max_tokens=m, logprobs=LOGPROBS, ignore_eos=True)
              for _, _, m in expected]
    engine = llm.llm_engine
    steps = []  # per step: how many requests ran, and how many adapter slots the LoRA layers used
    prepare_step = engine.runner.lora_manager.prepare_step

    def recording(rows):
        mapping = prepare_step(rows)
        steps.append((len(rows), 0 if mapping is None else len(mapping.segments)))
        return mapping

    engine.runner.lora_manager.prepare_step = recording
    outs = llm.generate(prompts, params, lora_request=adapters, use_tqdm=False)
    # one batch: the first step ran all 8 adapter requests (and the 4 base ones) with both adapters at once
    assert steps[0] == (8, 2)
    for out, (name, p, m) in zip(outs, expected):
        check(out, refs[name], p, m)
    # the adapters change the outputs (else equality above proves little)
    for i in range(len(ids)):
        runs = {tuple(outs[3 * i + j].outputs[0].token_ids[:6]) for j in range(3)}
        assert len(runs) == 3, f"prompt {i}: base and adapters agree"
    # repr names the method chosen at load, on the LM's projections only
    layer = engine.runner.model.model.layers[0]
    assert "lora(" in repr(layer.self_attn.qkv_proj) and "lora(" in repr(layer.mlp.down_proj)
    assert "lora(" not in repr(engine.runner.model.lm_head)


def test_one_slot_and_one_cached_adapter_still_serve_both_exactly(setup):
    # max_loras=1: the scheduler runs one adapter at a time (base requests alongside); max_cpu_loras=1: each
    # switch evicts the other adapter from memory and reads it from its directory again
    base, refs, loras = setup
    llm = LLM(str(base), dtype="float32", block_size=4, enable_lora=True, max_loras=1, max_cpu_loras=1,
              max_lora_rank=8)
    ids = prompt_ids()[:2]
    names = ["attn", "mlp", None, "attn", "mlp"]
    prompts = [{"prompt_token_ids": ids[i % 2]} for i in range(len(names))]
    params = SamplingParams(temperature=0.0, max_tokens=5, logprobs=LOGPROBS, ignore_eos=True)
    outs = llm.generate(prompts, params, lora_request=[loras[n] for n in names], use_tqdm=False)
    for i, (out, name) in enumerate(zip(outs, names)):
        check(out, refs[name], ids[i % 2], 5)
    manager = llm.llm_engine.runner.lora_manager
    assert len(manager.cpu_cache) == 1 and len(manager.slot_of) == 1


def test_bad_adapters_and_options_are_clear_errors(setup, tmp_path):
    base, _, loras = setup
    with pytest.raises(ValueError, match="max_cpu_loras=1 must be an integer >= max_loras"):
        LLM(str(base), enable_lora=True, max_loras=2, max_cpu_loras=1)
    with pytest.raises(ValueError, match="enable_lora=True with quantization='int8' is not supported yet"):
        LLM(str(base), enable_lora=True, quantization="int8")
    plain = LLM(str(base), dtype="float32", block_size=4, num_kv_blocks=64)
    with pytest.raises(ValueError, match="without enable_lora=True"):
        plain.generate("hello", lora_request=loras["attn"], use_tqdm=False)

    llm = LLM(str(base), dtype="float32", block_size=4, num_kv_blocks=64, enable_lora=True, max_lora_rank=4)
    with pytest.raises(ValueError, match="rank r=8 exceeds max_lora_rank=4"):
        llm.generate("hello", lora_request=loras["mlp"], use_tqdm=False)
    dora = make_peft_adapter(base, tmp_path / "dora", target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ValueError, match=r"DoRA \(use_dora=true\) is not supported"):
        llm.generate("hello", lora_request=LoRARequest("dora", 5, str(dora)), use_tqdm=False)
    biased = make_peft_adapter(base, tmp_path / "bias", target_modules=["q_proj"], bias="lora_only")
    with pytest.raises(ValueError, match=r"bias != 'none'"):
        llm.generate("hello", lora_request=LoRARequest("bias", 6, str(biased)), use_tqdm=False)
    head = make_peft_adapter(base, tmp_path / "head", target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match=r"target_modules \['lm_head'\] are not supported.*supported: q_proj"):
        llm.generate("hello", lora_request=LoRARequest("head", 7, str(head)), use_tqdm=False)
    # a regex target: checked through the tensors it produced (an embedding adapter saves the embedding)
    embed = make_peft_adapter(base, tmp_path / "embed", target_modules=r".*(q_proj|embed_tokens)")
    with pytest.raises(ValueError, match="embed_tokens.*is not a LoRA A/B weight"):
        llm.generate("hello", lora_request=LoRARequest("embed", 8, str(embed)), use_tqdm=False)
    with pytest.raises(ValueError, match="no adapter_config.json"):
        llm.generate("hello", lora_request=LoRARequest("missing", 9, str(tmp_path / "nowhere")), use_tqdm=False)
    llm.generate("hello", lora_request=loras["attn"], use_tqdm=False, sampling_params=SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="lora_int_id 1 already names adapter 'attn'"):
        llm.generate("hello", lora_request=LoRARequest("other", 1, str(dora)), use_tqdm=False)
    # nothing was left behind by the refused requests: the engine serves the next one
    out = llm.generate(["hello", "a photo"], SamplingParams(max_tokens=2, ignore_eos=True),
                       lora_request=[loras["attn"], None], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in out] == [2, 2]
    assert not llm.llm_engine.has_unfinished_requests()

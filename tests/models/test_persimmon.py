"""Persimmon alone (Fuyu's LM, also served as `PersimmonForCausalLM`) against transformers on a tiny checkpoint:
greedy ids and logprobs (float32, within 1e-4 of its raw logits) for a batch of prompts, prefilled in chunks."""
from __future__ import annotations

import pytest
import torch
from transformers import PersimmonConfig, PersimmonForCausalLM

from fovea import LLM, SamplingParams
from tests.oracle.fuyu import build_fuyu_tokenizer
from tests.oracle.llama import hf_reference, reinit_

PROMPTS = ["Hello world! This is a test", "A red train crossing a bridge", "What time of day is it?"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("persimmon")
    tokenizer = build_fuyu_tokenizer()
    config = PersimmonConfig(vocab_size=(len(tokenizer) + 15) // 16 * 16, hidden_size=48, intermediate_size=100,
                             num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                             rope_parameters={"rope_type": "default", "rope_theta": 25000.0,
                                              "partial_rotary_factor": 0.5},
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = PersimmonForCausalLM(config).eval()
    reinit_(model, 0, 1.0)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return str(out)


def test_batch_equals_transformers(ckpt):
    llm = LLM(ckpt, dtype="float32", block_size=4, max_model_len=64, max_num_batched_tokens=5)
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=2, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    for out in outs:
        ref_ids, ref_logprobs = hf_reference(ckpt, torch.tensor(out.prompt_token_ids), 8)
        assert out.outputs[0].token_ids == ref_ids
        for entry, ref in zip(out.outputs[0].logprobs, ref_logprobs):
            assert all(abs(lp.logprob - ref[t].item()) < 1e-4 for t, lp in entry.items())
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == len(PROMPTS)


def test_scaled_rope_is_refused(ckpt, tmp_path):
    import json
    import shutil

    shutil.copytree(ckpt, tmp_path / "scaled")
    config = json.loads((tmp_path / "scaled" / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 25000.0,
                                 "partial_rotary_factor": 0.5}
    (tmp_path / "scaled" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"rope_type 'linear' is not supported by fovea"):
        LLM(str(tmp_path / "scaled"), dtype="float32", block_size=4, max_model_len=64)

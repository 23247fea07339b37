"""Pipeline parallelism in real worker processes against the in-process engine: the same greedy ids, logprobs
within 1e-4 (float32) and seeded random samples, with images, chunked prefill and preemption in the batch (an
unseeded sample draws from the engine's one generator in the order the micro-batches reach the sampler, which
differs from one process's: it is checked for its length only). BLIP-2 (OPT,
3 layers split 2 + 1, lm_head tied to the token table that only the first stage holds), Qwen2.5-VL (M-RoPE, the
vision tower on the first stage) and Llama in three stages (a middle stage that only receives and sends)."""
from __future__ import annotations

import pytest

from fovea import LLM, SamplingParams
from tests.executor.test_multiproc import BLIP2_UNSEEDED_ROW, STRESS, assert_same, blip2_batch, qwen_batch
from tests.oracle.blip2 import build_tiny_blip2
from tests.oracle.llama import build_llama_tokenizer, build_tiny_llama
from tests.oracle.qwen2_5_vl import build_tiny_qwen2_5_vl


def run_both(ckpt, batch, **options):
    prompts, params = batch
    reference = LLM(ckpt, **options).generate(prompts, params, use_tqdm=False)
    llm = LLM(ckpt, **options, pipeline_parallel_size=2)
    return reference, llm.generate(prompts, params, use_tqdm=False), llm


def test_blip2_two_stages_equal_one_process(tmp_path):
    ckpt = str(build_tiny_blip2(tmp_path / "blip2", seed=0, init_gain=2.0, num_layers=3))
    reference, outputs, llm = run_both(ckpt, blip2_batch(), **STRESS)
    unseeded = BLIP2_UNSEEDED_ROW
    assert_same(reference[:unseeded], outputs[:unseeded])
    assert len(outputs[unseeded].outputs[0].token_ids) == len(reference[unseeded].outputs[0].token_ids) == 8
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert len({tuple(o.outputs[0].token_ids) for o in outputs}) > 3


def test_qwen2_5_vl_two_stages_equal_one_process(tmp_path):
    ckpt = str(build_tiny_qwen2_5_vl(tmp_path / "qwen", seed=0))
    reference, outputs, llm = run_both(ckpt, qwen_batch(), dtype="float32", block_size=4,
                                       max_num_batched_tokens=32, num_kv_blocks=30, num_threads=1)
    assert_same(reference, outputs)
    assert llm.llm_engine.scheduler.num_preemptions > 0


def test_llama_three_stages_equal_one_process(tmp_path):
    ckpt = str(build_tiny_llama(tmp_path / "llama", seed=0, num_layers=3))
    tokenizer = build_llama_tokenizer()
    words = list(tokenizer.get_vocab())[20:200]
    prompts = [{"prompt_token_ids": tokenizer.convert_tokens_to_ids(words[i * 7:i * 7 + 5 + 3 * i])}
               for i in range(6)]
    params = [SamplingParams(temperature=0.0, max_tokens=6 + i, logprobs=3, ignore_eos=True) for i in range(6)]
    options = dict(dtype="float32", block_size=4, max_num_batched_tokens=16, num_kv_blocks=14, num_threads=1)
    reference = LLM(ckpt, **options).generate(prompts, params, use_tqdm=False)
    llm = LLM(ckpt, **options, pipeline_parallel_size=3)
    assert_same(reference, llm.generate(prompts, params, use_tqdm=False))
    assert llm.llm_engine.scheduler.num_preemptions > 0


def test_more_stages_than_layers_is_refused_before_spawning(tmp_path):
    ckpt = str(build_tiny_blip2(tmp_path / "blip2", seed=0))
    with pytest.raises(ValueError, match="pipeline_parallel_size=3 is more than the language model's 2 decoder"):
        LLM(ckpt, pipeline_parallel_size=3)

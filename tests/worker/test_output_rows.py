"""A prefill step reads one row per request (its logits row): a model that declares `SupportsOutputRows` runs its
last layer past the q/k/v projection on those rows only. Checked: the pruned path is taken (the last layer's MLP
sees one row per sampled request, the first layer every row), it is not taken where every row is read (prompt
logprobs) or nothing is sampled, and its outputs equal the unpruned run's (greedy ids; float32 logprobs to 1e-5)
with the C++ kernels and without them (gather + SDPA), chunked prefill (a cached prefix) and a one-layer model
included. Agreement with transformers is the e2e tests' (they run the pruned path)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fovea import LLM, SamplingParams
from fovea import kernels
from fovea.layers.attention import build_attention_metadata
from fovea.models.interfaces import supports_output_rows
from fovea.models.blip2 import Blip2ForConditionalGeneration
from fovea.models.llama import LlamaForCausalLM
from fovea.models.opt import OPTForCausalLM
from fovea.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from fovea.models.t5 import T5ForConditionalGeneration
from tests.oracle.blip2 import build_tiny_blip2
from tests.oracle.llama import build_tiny_llama
from tests.oracle.t5 import build_tiny_blip2_t5

PROMPTS = ["Question: how many cats are there? Answer:", "Hello",
           "A photo of a cat sitting on a window sill, looking at the birds outside. The birds are"]


def rows_seen(llm: LLM, layer_index: int, module: str = "mlp") -> list[int]:
    """Rows each forward of one decoder layer's module receives, recorded from now on."""
    seen: list[int] = []
    layer = llm.llm_engine.engine_core.runner.model.model.layers[layer_index]
    layer.get_submodule(module).register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    return seen


def run(llm: LLM, prompts=PROMPTS, **params):
    sampling = SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, ignore_eos=True, **params)
    return llm.generate(prompts, sampling, use_tqdm=False)


def assert_same(outs, ref, atol=1e-5):
    for got, want in zip(outs, ref):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for entry, ref_entry in zip(got.outputs[0].logprobs, want.outputs[0].logprobs):
            assert entry.keys() == ref_entry.keys()
            for token, lp in entry.items():
                assert abs(lp.logprob - ref_entry[token].logprob) < atol


def test_declared_by_the_decoders_that_honour_it():
    assert supports_output_rows(LlamaForCausalLM) and supports_output_rows(Qwen2_5_VLForConditionalGeneration)
    assert supports_output_rows(OPTForCausalLM) and supports_output_rows(Blip2ForConditionalGeneration)
    assert not supports_output_rows(T5ForConditionalGeneration)


def test_not_pruned_in_an_encoder_decoder(tmp_path):
    # BLIP-2 declares it for its decoder-only LMs; over Flan-T5 the runner leaves the decoder's rows alone
    llm = LLM(str(build_tiny_blip2_t5(tmp_path)), dtype="float32", max_model_len=64)
    assert not llm.llm_engine.engine_core.runner.prunes_output_rows


@pytest.mark.parametrize("pre_norm", [True, False])
def test_blip2_over_opt_pruned_rows_equal_every_row(tmp_path, pre_norm):
    """OPT's last layer (pre-norm, and post-norm as OPT-350m) on the logits rows only, inside BLIP-2: the rows it
    sees, and the same outputs as every row (the e2e tests check both against transformers)."""
    model_dir = str(build_tiny_blip2(tmp_path, seed=5, do_layer_norm_before=pre_norm, init_gain=1.5))
    llm = LLM(model_dir, dtype="float32", block_size=4, max_model_len=64, enable_prefix_caching=False)
    decoder = llm.llm_engine.engine_core.runner.model.language_model.model.decoder
    first, last = [], []
    decoder.layers[0].fc1.register_forward_hook(lambda _m, args, _out: first.append(args[0].shape[0]))
    decoder.layers[-1].fc1.register_forward_hook(lambda _m, args, _out: last.append(args[0].shape[0]))
    rng = np.random.default_rng(0)
    prompts = [{"prompt": text, "multi_modal_data": {"image": Image.fromarray(
        rng.integers(0, 256, (30 + 7 * i, 40, 3), dtype=np.uint8))}} for i, text in enumerate(PROMPTS)]
    outs = run(llm, prompts=prompts)
    num_prompt = sum(len(o.prompt_token_ids) for o in outs)
    assert first[0] == num_prompt and last[0] == len(PROMPTS)  # the prefill: every row in, one per request out
    llm.llm_engine.engine_core.runner.prunes_output_rows = False
    assert_same(outs, run(llm, prompts=prompts))
    assert last[4] == num_prompt  # the reference run computed every row


def test_output_group_is_each_sampled_requests_last_token():
    # request 0: a 3-token chunk ending its context; request 1: a decode; request 2: a 4-token chunk after 5 cached
    meta = build_attention_metadata([3, 1, 4], [3, 7, 9], [[1], [2, 3], [4, 5, 6]], 4, output_requests=[0, 2])
    g = meta.output_group
    assert g.token_index.tolist() == [2, 7] and g.context_lens.tolist() == [3, 9] and g.is_decode
    assert g.block_table.tolist() == [[1, 0, 0], [4, 5, 6]]
    assert build_attention_metadata([3, 1], [3, 7], [[1], [2, 3]], 4).output_group is None


@pytest.mark.parametrize("cpu_kernels", ["auto", "off"])
@pytest.mark.parametrize("layers", [2, 1])
def test_pruned_rows_equal_every_row(tmp_path, cpu_kernels, layers):
    if cpu_kernels == "auto" and not kernels.is_available():
        pytest.skip("fovea's C++ kernels do not build here")
    model_dir = str(build_tiny_llama(tmp_path, seed=3, num_layers=layers))
    llm = LLM(model_dir, dtype="float32", block_size=4, max_model_len=64, cpu_kernels=cpu_kernels,
              enable_prefix_caching=False)
    # the first layer's MLP, and the last layer's q/k/v projection, see every row
    first, last_kv, last = rows_seen(llm, 0), rows_seen(llm, -1, "self_attn.qkv_proj"), rows_seen(llm, -1)
    outs = run(llm)
    num_prompt = sum(len(o.prompt_token_ids) for o in outs)
    # the prefill step: every row in, one per request out
    assert last_kv[0] == num_prompt and last[0] == len(PROMPTS) and first[0] == (num_prompt if layers > 1 else 3)
    assert first[1:] == last[1:] == [len(PROMPTS)] * 3  # decode steps read every row: nothing to skip
    llm.llm_engine.engine_core.runner.prunes_output_rows = False
    assert_same(outs, run(llm))
    assert last[4] == num_prompt  # the reference run computed every row
    # chunked prefill: chunks of 5 tokens, so prompts continue from cached blocks and some chunks sample nothing
    chunked = LLM(model_dir, dtype="float32", block_size=4, max_model_len=64, cpu_kernels=cpu_kernels,
                  max_num_batched_tokens=5, enable_prefix_caching=False)
    last = rows_seen(chunked, -1)
    assert_same(run(chunked), outs)
    assert 1 in last and 5 in last  # a chunk ending a prompt was pruned; a middle chunk (no logits) was not


def test_every_row_when_prompt_logprobs_are_asked(tmp_path):
    model_dir = str(build_tiny_llama(tmp_path, seed=4))
    llm = LLM(model_dir, dtype="float32", block_size=4, max_model_len=64, enable_prefix_caching=False)
    last = rows_seen(llm, -1)
    outs = run(llm, prompt_logprobs=2)
    assert last[0] == sum(len(o.prompt_token_ids) for o in outs)
    assert all(len(o.prompt_logprobs) == len(o.prompt_token_ids) for o in outs)

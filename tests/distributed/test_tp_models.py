"""Whole language models split over 2 real ranks (gloo) give the logits one process gives, within 1e-5 absolute
+ 1e-5 relative (float32).

OPT (tied, `word_embed_proj_dim` < hidden, an odd vocabulary: the last rank's vocabulary rows padded), OPT untied
post-norm, Qwen2 (KV heads split 1 + 1), Qwen2 with one KV head (replicated on both ranks, untied), Llama with
biases. Each is loaded by `load_model` (the methods packed as in serving) and driven over a paged KV cache: two
requests, one prefilled in chunks, then decode steps of both in one flat batch (teacher-forced, so the steps do
not depend on the argmax). Each rank's KV cache holds its KV heads only, and the models and options that cannot
run split are refused by name."""
from __future__ import annotations

import re

import pytest
import torch
import transformers
from transformers import OPTConfig

from torch import nn

from fovea.layers.attention import Attention
from fovea.models.blip2 import Blip2ForConditionalGeneration
from fovea.models.interfaces import check_tensor_parallel
from fovea.models.fuyu import FuyuForCausalLM
from fovea.models.llama import LlamaForCausalLM
from fovea.models.opt import OPTForCausalLM
from fovea.models.persimmon import PersimmonForCausalLM
from fovea.models.quantization import prepare_quantization
from fovea.models.qwen2 import Qwen2ForCausalLM
from fovea.models.t5 import T5ForConditionalGeneration
from fovea.models.weights import build_model, load_model
from tests.distributed.ranks import run_ranks
from fovea.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from fovea.multimodal.processing import InputProcessingContext
from fovea.multimodal.registry import MULTIMODAL_REGISTRY
from tests.models.test_qwen2_5_vl_model import CASES as QWEN_VL_CASES
from tests.models.test_qwen2_5_vl_model import PagedSteps, Request, check, generate
from tests.oracle.qwen2_5_vl import build_tiny_qwen2_5_vl
from tests.oracle.llama import build_tiny_llama, reinit_
from tests.oracle.qwen2_5_vl import build_tiny_qwen2

TP = 2


def build_tiny_opt(out_dir, *, seed: int, tied: bool, pre_norm: bool, word_embed_proj_dim: int) -> str:
    config = OPTConfig(vocab_size=301, hidden_size=32, num_attention_heads=4, ffn_dim=48, num_hidden_layers=2,
                       max_position_embeddings=64, word_embed_proj_dim=word_embed_proj_dim,
                       do_layer_norm_before=pre_norm, tie_word_embeddings=tied, enable_bias=True)
    torch.manual_seed(seed)
    model = transformers.OPTForCausalLM(config).eval()
    reinit_(model, seed, 1.5)
    model.save_pretrained(str(out_dir))
    return str(out_dir)


MODELS = {  # name -> (class, builder)
    "opt": (OPTForCausalLM, lambda d: build_tiny_opt(d, seed=1, tied=True, pre_norm=True, word_embed_proj_dim=24)),
    "opt-untied-post-norm": (OPTForCausalLM,
                             lambda d: build_tiny_opt(d, seed=2, tied=False, pre_norm=False, word_embed_proj_dim=32)),
    "qwen2": (Qwen2ForCausalLM, lambda d: str(build_tiny_qwen2(d, seed=3, num_kv_heads=2))),
    "qwen2-one-kv-head": (Qwen2ForCausalLM,
                          lambda d: str(build_tiny_qwen2(d, seed=4, num_kv_heads=1, tie_word_embeddings=False))),
    "llama": (LlamaForCausalLM, lambda d: str(build_tiny_llama(d, seed=5, num_kv_heads=1, attention_bias=True,
                                                               mlp_bias=True))),
}


def plan_steps(vocab_size: int) -> list[list[tuple[str, list[int], list[int]]]]:
    """Steps of (request, token ids, positions): request a prefilled in chunks of 5 (b joins the second step
    whole), then 4 decode steps of both."""
    gen = torch.Generator().manual_seed(7)
    a, b = torch.randint(4, vocab_size, (12,), generator=gen).tolist(), torch.randint(4, vocab_size, (7,),
                                                                                      generator=gen).tolist()
    steps = [[("a", a[:5], list(range(5)))], [("a", a[5:10], list(range(5, 10))), ("b", b, list(range(7)))],
             [("a", a[10:], [10, 11])]]
    for i in range(4):
        token_a, token_b = torch.randint(4, vocab_size, (2,), generator=gen).tolist()
        steps.append([("a", [token_a], [12 + i]), ("b", [token_b], [7 + i])])
    return steps


def run_model(model, steps) -> list[torch.Tensor]:
    """log_softmax at each chunk's last token, every step, [num_chunks, vocab] per step."""
    paged, out = PagedSteps(model), []
    with torch.no_grad():
        for step in steps:
            chunks = [(name, model.embed_input_ids(torch.tensor(ids)), torch.tensor(pos)) for name, ids, pos in step]
            out.append(torch.stack(paged.step(chunks)))
    return out


def kv_bytes_per_token(model) -> int:
    return sum(2 * a.num_kv_heads * a.head_dim * 4 for a in model.modules() if isinstance(a, Attention))


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _refusals(qwen2_dir: str) -> dict[str, str]:
    """What each model or option that cannot run split says, in a rank of 2."""
    small_t5 = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4)
    attempts = {
        "t5": lambda: build_model(T5ForConditionalGeneration, small_t5, torch.float32),
        "persimmon": lambda: build_model(PersimmonForCausalLM, transformers.PersimmonConfig(), torch.float32),
        "fuyu": lambda: build_model(FuyuForCausalLM, transformers.FuyuConfig(), torch.float32),
        "blip2-t5": lambda: build_model(Blip2ForConditionalGeneration,
                                        transformers.Blip2Config(text_config=small_t5.to_dict()), torch.float32),
        "compressed-tensors": lambda: prepare_quantization(
            nn.Linear(2, 2), {"quantization_config": {"quant_method": "compressed-tensors"}}, qwen2_dir, None, False),
    }
    messages = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            messages[name] = "(no error)"
        except ValueError as e:
            messages[name] = str(e)
    return messages


VL_CASES = ("image", "two images, thin and tiny", "text only")


def qwen_vl_requests(model_dir: str, model) -> list[Request]:
    config = transformers.AutoConfig.from_pretrained(model_dir)
    ctx = InputProcessingContext(model_dir, config, transformers.AutoTokenizer.from_pretrained(model_dir))
    processor = MULTIMODAL_REGISTRY.create_processor(Qwen2_5_VLForConditionalGeneration, ctx)
    return [Request(name, processor, model, *QWEN_VL_CASES[name]) for name in VL_CASES]


def run_qwen_vl(model_dir: str) -> dict[str, list[torch.Tensor]]:
    """Qwen2.5-VL's requests with images in one batch, prefilled in chunks of 7 (through the images), decoded
    greedily: the vision tower replicated, the LM split."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    model, _ = load_model(Qwen2_5_VLForConditionalGeneration, config, model_dir, torch.float32)
    return generate(model, qwen_vl_requests(model_dir, model), chunk=7)


def _run_in_rank(checkpoints: dict[str, str], qwen_vl_dir: str) -> dict:
    results = {"qwen2_5_vl": run_qwen_vl(qwen_vl_dir)}
    for name, model_dir in [*checkpoints.items(), ("qwen2-int8", checkpoints["qwen2"])]:
        cls, _ = MODELS[name.removesuffix("-int8")]
        config = transformers.AutoConfig.from_pretrained(model_dir)
        model, _ = load_model(cls, config, model_dir, torch.float32,
                              quantization="int8" if name.endswith("-int8") else None)
        results[name] = {"logprobs": run_model(model, plan_steps(config.vocab_size)),
                         "kv_bytes": kv_bytes_per_token(model), "weight_bytes": weight_bytes(model)}
    results["refusals"] = _refusals(checkpoints["qwen2"])
    return results


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {name: builder(tmp_path_factory.mktemp(name)) for name, (_, builder) in MODELS.items()}


@pytest.fixture(scope="module")
def qwen_vl_dir(tmp_path_factory):
    # one KV head for 2 ranks: each holds it (replicated), as each holds 2 of the 4 query heads
    return str(build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen_vl"), seed=0, num_kv_heads=1))


@pytest.fixture(scope="module")
def by_rank(checkpoints, qwen_vl_dir):
    """Every model in the same 2 ranks (one spawn: a rank's start-up costs more than these models)."""
    return run_ranks(_run_in_rank, TP, checkpoints, qwen_vl_dir)


def test_qwen2_5_vl_with_images_matches_transformers_split(qwen_vl_dir, by_rank):
    """The multimodal model end to end at the model level (the engine's runs are in tests/e2e): greedy ids equal
    transformers' and log-probabilities within 1e-4, on both ranks."""
    config = transformers.AutoConfig.from_pretrained(qwen_vl_dir)
    single = Qwen2_5_VLForConditionalGeneration(config)  # only for the processor's M-RoPE rule: not run
    for request in qwen_vl_requests(qwen_vl_dir, single):
        for rank, result in by_rank.items():
            check(qwen_vl_dir, request, result["qwen2_5_vl"][request.name])


@pytest.mark.parametrize("name", MODELS)
def test_split_model_gives_the_logits_of_one_process(checkpoints, by_rank, name):
    cls, _ = MODELS[name]
    model_dir = checkpoints[name]
    config = transformers.AutoConfig.from_pretrained(model_dir)
    single, _ = load_model(cls, config, model_dir, torch.float32)
    want = run_model(single, plan_steps(config.vocab_size))
    assert len({int(row.argmax()) for step in want for row in step}) > 3  # logits that vary from step to step
    results = {rank: r[name] for rank, r in by_rank.items()}
    for rank, result in results.items():
        for step, (got, expected) in enumerate(zip(result["logprobs"], want, strict=True)):
            assert got.shape == expected.shape == (len(got), config.vocab_size)
            assert torch.equal(got.argmax(-1), expected.argmax(-1)), (rank, step)
            # 1e-5 absolute plus 1e-5 relative: these models' log-probabilities reach -30, where float32's
            # different summation order over a split (rank partial sums, then the all-reduce) moves a few ulps
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"rank {rank}, step {step}")
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    # each rank's KV cache holds its KV heads: half of them, or the one it reads when there are fewer than ranks
    expected_kv = kv_bytes_per_token(single) // min(TP, num_kv_heads)
    assert [r["kv_bytes"] for r in results.values()] == [expected_kv] * TP
    # split weights: each rank holds well under the whole (norms, positions, project_in/out replicated)
    assert all(r["weight_bytes"] < 0.7 * weight_bytes(single) for r in results.values())


def test_int8_runs_split(checkpoints, by_rank):
    """quantization='int8' quantizes each rank's slice per output channel: column-split layers get the scales
    one process computes, row-split ones finer scales (a rank's half row), so the split int8 model is not equal
    to the single-process one but as close to float32 as it is (probabilities, all steps)."""
    model_dir = checkpoints["qwen2"]
    config = transformers.AutoConfig.from_pretrained(model_dir)
    exact = run_model(load_model(Qwen2ForCausalLM, config, model_dir, torch.float32)[0], plan_steps(config.vocab_size))
    single, _ = load_model(Qwen2ForCausalLM, config, model_dir, torch.float32, quantization="int8")
    assert single.model.layers[0].mlp.down_proj.method.name == "int8"

    def error(logprobs):
        return max((got.exp() - want.exp()).abs().max().item() for got, want in zip(logprobs, exact, strict=True))

    single_error = error(run_model(single, plan_steps(config.vocab_size)))
    assert 1e-4 < single_error < 0.2
    for rank, result in by_rank.items():
        assert error(result["qwen2-int8"]["logprobs"]) < 2 * single_error, rank


@pytest.mark.parametrize("name, message", [
    ("t5", "T5ForConditionalGeneration does not support tensor parallelism; supported: OPT, Llama"),
    ("persimmon", "PersimmonForCausalLM does not support tensor parallelism"),
    ("fuyu", "FuyuForCausalLM does not support tensor parallelism"),
    ("blip2-t5", "Blip2ForConditionalGeneration over a t5 language model does not support tensor parallelism"),
    ("compressed-tensors", "compressed-tensors checkpoints .* run with tensor_parallel_size=1 only"),
])
def test_what_cannot_run_split_is_refused_by_name(by_rank, name, message):
    for rank, result in by_rank.items():
        assert re.search(message, result["refusals"][name]), (rank, result["refusals"][name])


def test_the_driver_can_refuse_before_any_rank_starts(checkpoints):
    """`check_tensor_parallel(model_cls, tp, hf_config)` needs no rank: the executor calls it before spawning."""
    small_t5 = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4)
    with pytest.raises(ValueError, match="tensor_parallel_size=2: T5ForConditionalGeneration does not support"):
        check_tensor_parallel(T5ForConditionalGeneration, 2, small_t5)
    with pytest.raises(ValueError, match="Blip2ForConditionalGeneration over a t5 language model does not support"):
        check_tensor_parallel(Blip2ForConditionalGeneration, 2, transformers.Blip2Config(text_config=small_t5.to_dict()))
    check_tensor_parallel(Blip2ForConditionalGeneration, 2, transformers.Blip2Config())  # OPT: split
    check_tensor_parallel(T5ForConditionalGeneration, 1, small_t5)  # one rank: anything runs

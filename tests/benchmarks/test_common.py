"""benchmarks/common.py's shared timing loops and printed rows, on a real tiny BLIP-2 (fovea's offline LLM): every
benchmark script times its engines through these, so what they count is checked here once."""
import pytest

from benchmarks.common import compare_with_transformers, time_offline, time_static_batches
from fovea import LLM, SamplingParams
from tests.oracle.blip2 import build_tiny_blip2
from tests.e2e.blip2_cases import make_image


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(str(build_tiny_blip2(tmp_path_factory.mktemp("blip2"), seed=0)), max_model_len=128)


def test_time_offline_counts_every_requested_token_and_the_prompts(llm):
    batch = [{"prompt": f"Question: shape {i}? Answer:", "multi_modal_data": {"image": make_image(i, (30, 30))}}
             for i in range(3)]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (3, 5, 7)]
    seconds, useful, prompt_tokens = time_offline(llm, "generate", batch, params, repeats=2)
    assert seconds > 0 and useful == 15
    expected = sum(len(o.prompt_token_ids) for o in llm.generate(batch, params, use_tqdm=False))
    assert prompt_tokens == expected
    # a request that stops before its max_tokens is refused: the figure would count work not done
    stopping = [SamplingParams(temperature=0.0, max_tokens=5, stop_token_ids=list(range(1000))) for _ in batch]
    with pytest.raises(AssertionError):
        time_offline(llm, "generate", batch, stopping)


def test_time_static_batches_runs_the_warmup_then_every_batch_in_order():
    calls = []
    seconds = time_static_batches(lambda lo, hi: calls.append((lo, hi)), 7, 3, repeats=2)
    assert seconds >= 0
    assert calls == [(0, 2), (0, 3), (3, 6), (6, 7), (0, 3), (3, 6), (6, 7)]


def test_compare_with_transformers_prints_each_batch_size_then_fovea_against_the_best(capsys):
    rates = {8: 10.0, 16: 25.0}  # seconds for 100 tokens: 10 and 4 tok/s
    compare_with_transformers(["bfloat16"], [8, 16], lambda dtype, bs: (rates[bs], 100),
                              lambda dtype: (2.0, 100, 7))
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "  bfloat16  transformers bs=8       10.0 tok/s  (10.0 s)",
        "  bfloat16  transformers bs=16       4.0 tok/s  (25.0 s)",
        "  bfloat16  fovea                  50.0 tok/s  (2.0 s)   ratio vs transformers' best (bs=8): 5.00x"]

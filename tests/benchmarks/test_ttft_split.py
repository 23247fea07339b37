"""benchmarks/ttft_split.py: a request's TTFT split by part on a tiny BLIP-2; each part's FLOPs, by dtype, equal a
count by hand from the model's dimensions, the parts partition the request's wall time, the bound follows from the
FLOPs and the peaks, and the recorder leaves the engine as it found it."""
import time

import numpy as np
import pytest
from PIL import Image

from benchmarks.ttft_split import PARTS, TTFTRecorder
from fovea import LLM, SamplingParams
from tests.oracle.blip2 import build_tiny_blip2

# build_tiny_blip2's defaults: every width 32 (MLPs 64), 2 layers, 4 heads, 8 queries, 30 px images of 6 px patches,
# a Q-Former that cross-attends in every layer
WIDTH, MLP, LAYERS, HEADS, QUERIES = 32, 64, 2, 4, 8
HEAD_DIM = WIDTH // HEADS
PATCHES = (30 // 6) ** 2 + 1  # and the class token


@pytest.fixture(scope="module")
def tiny_blip2(tmp_path_factory):
    return build_tiny_blip2(tmp_path_factory.mktemp("blip2"))


def attention_flops(rows: int, keys: int) -> int:
    return 4 * HEADS * HEAD_DIM * rows * keys


def test_split_of_one_request_matches_a_count_by_hand(tiny_blip2):
    llm = LLM(str(tiny_blip2), dtype="bfloat16", max_model_len=128, max_num_seqs=1, num_kv_blocks=32)
    runner = llm.llm_engine.runner
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    request = {"prompt": "a photo of", "multi_modal_data": {"image": picture}}
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    # a warm-up on another image, as latency.py's: one-time work (the Q-Former's first self-attention of the learned
    # queries, kept per model) is done before the recorded request
    warm_up = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    llm.generate({"prompt": "a photo of", "multi_modal_data": {"image": warm_up}}, params, use_tqdm=False)
    recorder = TTFTRecorder(llm)
    start = time.perf_counter()
    out = llm.generate(request, params, use_tqdm=False)[0]
    wall = time.perf_counter() - start
    recorder.remove()
    split = recorder.split
    split.finish(wall)
    parts = split.parts
    prompt = len(out.prompt_token_ids)

    # a ViT / OPT layer: qkv (in x 3 in), output projection, fc1, fc2
    layer_weights = WIDTH * 3 * WIDTH + WIDTH * WIDTH + 2 * WIDTH * MLP
    vit = LAYERS * (2 * PATCHES * layer_weights + attention_flops(PATCHES, PATCHES))
    assert parts["vision tower"].flops == {"bfloat16": vit}
    # a Q-Former layer on the queries: self-attention q, k, v, o; cross-attention q and o on the queries, k and v on
    # the patches; the query feed-forward
    # (the first layer's self-attention sees the learned queries only: done once per model, in the warm-up)
    qformer = LAYERS * (2 * QUERIES * (4 * WIDTH * WIDTH) + attention_flops(QUERIES, QUERIES)
                        + 2 * QUERIES * 2 * WIDTH * WIDTH + 2 * PATCHES * 2 * WIDTH * WIDTH
                        + attention_flops(QUERIES, PATCHES) + 2 * QUERIES * 2 * WIDTH * MLP) \
        - 2 * QUERIES * (4 * WIDTH * WIDTH) - attention_flops(QUERIES, QUERIES)
    projection = 2 * QUERIES * WIDTH * WIDTH  # language_projection, in the vision dtype
    assert parts["Q-Former / merger"].flops == {"float32": qformer, "bfloat16": projection}
    # OPT's last layer runs past its q/k/v projection on the one row that samples (SupportsOutputRows)
    qkv = WIDTH * 3 * WIDTH
    lm = (LAYERS - 1) * (2 * prompt * layer_weights + attention_flops(prompt * (prompt + 1) // 2, 1)) \
        + 2 * prompt * qkv + 2 * (layer_weights - qkv) + attention_flops(1, prompt)
    assert parts["LM prefill"].flops == {"bfloat16": lm}
    assert parts["lm_head"].flops == {"bfloat16": 2 * WIDTH * runner.vocab_size}  # the one row that samples
    for name in ("image preprocessing", "input processing", "sampler", "engine / Python"):
        assert parts[name].flops == {}

    # the parts partition the wall time, each counted once (nested parts are taken out of their parents)
    assert list(parts) == list(PARTS)
    assert all(p.seconds > 0 for p in parts.values())
    assert sum(p.seconds for p in parts.values()) == pytest.approx(wall)
    # the bound: every FLOP at one dtype's peak, or each at the peak of its own dtype
    peaks = {"bfloat16": 400.0, "float32": 200.0}
    bf16 = vit + projection + lm + 2 * WIDTH * runner.vocab_size
    assert split.bound_s(peaks, "bfloat16") == pytest.approx((bf16 + qformer) / 400e9)
    assert split.bound_s(peaks) == pytest.approx(bf16 / 400e9 + qformer / 200e9)
    table = split.table(peaks)
    assert [line.split()[0] for line in table.splitlines()[1:]] == [p.split()[0] for p in PARTS] + ["TTFT"]

    # removed: the engine's own methods again, nothing more recorded, the same output
    assert "forward" not in vars(runner.model) and "process" not in vars(llm.llm_engine.input_processor)
    assert type(runner.sampler).__name__ == "Sampler"
    seconds = {name: p.seconds for name, p in parts.items()}
    again = llm.generate(request, params, use_tqdm=False)[0]
    assert again.outputs[0].token_ids == out.outputs[0].token_ids
    assert {name: p.seconds for name, p in parts.items()} == seconds

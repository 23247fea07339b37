"""benchmarks/roofline_phases.py: each phase's FLOPs and bytes on a tiny Qwen2.5-VL equal a count by hand from the
model's dimensions, the phases partition the run's wall time, and the recorder leaves the engine as it found it."""
import time

import numpy as np
import pytest
from PIL import Image

from benchmarks.roofline import Peaks, format_phases
from benchmarks.roofline_phases import PHASES, PhaseRecorder, paged_attention_cost
from fovea import LLM, SamplingParams
from tests.oracle.qwen2_5_vl import build_tiny_qwen2_5_vl

HIDDEN, HEADS, KV_HEADS, LAYERS = 64, 4, 2, 2  # build_tiny_qwen2_5_vl's defaults
HEAD_DIM, MLP = HIDDEN // HEADS, 2 * HIDDEN


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen"))


def test_paged_attention_cost_by_hand():
    # a chunk of 3 queries ending at context 5 sees 3, 4 and 5 keys; a decode row at context 7 sees 7
    flops, nbytes = paged_attention_cost([3, 1], [5, 7], num_heads=2, num_kv_heads=1, head_dim=8, element_bytes=2)
    assert flops == 4 * 2 * 8 * (3 + 4 + 5 + 7)
    assert nbytes == 2 * (2 * 1 * 8 * (5 + 7) + 2 * 2 * 8 * (3 + 1))  # K and V of both contexts, q and out rows


def test_phases_of_a_tiny_run_match_a_count_by_hand(tiny_qwen):
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=512, max_num_seqs=2, num_kv_blocks=64)
    runner = llm.llm_engine.runner
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8))
    message = [{"role": "user", "content": [{"type": "image_pil", "image_pil": picture},
                                            {"type": "text", "text": "hello there"}]}]
    num_tokens = 5
    recorder = PhaseRecorder(llm)
    start = time.perf_counter()
    out = llm.chat(message, SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True), use_tqdm=False)[0]
    wall = time.perf_counter() - start
    recorder.remove()
    recorder.totals.finish(wall)
    phases = recorder.totals.phases
    prompt = len(out.prompt_token_ids)
    vocab = runner.vocab_size

    # weights of one LM layer, in x out: q, k, v, o, then gate, up and down
    per_layer = HIDDEN * HIDDEN + 2 * HIDDEN * KV_HEADS * HEAD_DIM + HIDDEN * HIDDEN + 3 * HIDDEN * MLP
    weights = LAYERS * per_layer
    decode_ctx = sum(prompt + j for j in range(1, num_tokens))  # context lengths of the 4 decode steps
    assert phases["decode linears"].flops == 2 * weights * (num_tokens - 1)
    assert phases["decode attention"].flops == 4 * HEADS * HEAD_DIM * decode_ctx * LAYERS
    # every decode step reads K and V of its whole context (float32: 4 bytes), plus its query and output row
    assert phases["decode attention"].bytes == 4 * LAYERS * (2 * KV_HEADS * HEAD_DIM * decode_ctx
                                                             + 2 * HEADS * HEAD_DIM * (num_tokens - 1))
    # each decode step reads every LM weight once, plus its one row in and out of each linear
    # (packed q/k/v: 64 -> 128, o 64 -> 64, packed gate/up 64 -> 256, down 128 -> 64)
    activations = LAYERS * ((64 + 128) + (64 + 64) + (64 + 256) + (128 + 64))
    assert phases["decode linears"].bytes == 4 * (weights + activations) * (num_tokens - 1)
    causal_pairs = prompt * (prompt + 1) // 2
    # the prefill's last layer (SupportsOutputRows) runs its packed q/k/v projection on every prompt row and the rest
    # (attention, o, the MLP) for the one row that samples
    last_rest = per_layer - (HIDDEN * HIDDEN + 2 * HIDDEN * KV_HEADS * HEAD_DIM)
    assert phases["LM prefill"].flops == 2 * (weights * prompt - last_rest * (prompt - 1)) \
        + 4 * HEADS * HEAD_DIM * (causal_pairs * (LAYERS - 1) + prompt)
    assert phases["lm_head"].flops == 2 * HIDDEN * vocab * num_tokens  # one sampled row per step
    assert phases["vision tower"].flops > 0 and phases["vision tower"].seconds > 0
    assert phases["sampler"].calls == num_tokens and phases["lm_head"].calls == num_tokens
    assert recorder.totals.num_steps == num_tokens and recorder.totals.num_decode_steps == num_tokens - 1
    # the phases partition the wall time
    assert list(phases) == list(PHASES)
    assert all(p.seconds >= 0 for p in phases.values())
    assert sum(p.seconds for p in phases.values()) == pytest.approx(wall)
    # removed: the engine's own methods and sampler again, and it still runs
    assert "execute" not in vars(runner) and "forward" not in vars(runner.model)
    assert type(runner.sampler).__name__ == "Sampler"
    again = llm.chat(message, SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True), use_tqdm=False)[0]
    assert again.outputs[0].token_ids == out.outputs[0].token_ids
    assert phases["sampler"].calls == num_tokens  # nothing recorded after remove()


def test_phase_table_format(tiny_qwen):
    from benchmarks.roofline_phases import PhaseTotals

    totals = PhaseTotals()
    totals.phases["decode linears"].seconds, totals.phases["decode linears"].bytes = 2.0, 50e9  # 25 GB/s
    totals.phases["LM prefill"].seconds, totals.phases["LM prefill"].flops = 1.0, 200e9  # 200 GFLOP/s
    totals.finish(4.0)
    table = format_phases("title", totals, Peaks({"bfloat16": 400.0, "float32": 200.0}, 50.0), "bfloat16")
    lines = {line.split("  ")[0].strip(): line for line in table.splitlines()}
    assert "50%" in lines["decode linears"] and "memory" in lines["decode linears"]  # 25 of 50 GB/s
    assert "50%" in lines["LM prefill"] and "compute" in lines["LM prefill"]  # 200 of 400 GFLOP/s
    assert "25.0%" in lines["scheduling / Python"]  # the 1 s left of 4
    assert lines["run"].split()[1] == "4.00"

"""The memory profiling pass run scaled (the encoder, then the language model over two short steps, the peak
extrapolated to the worst-case step's tokens) against the whole step run as it is, each in a fresh process
through a real engine start: the estimate must never be below the whole step's reading (the KV cache would be
sized into memory the step needs), and not far above it. The scaling's arithmetic is checked exactly."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fovea.worker.memory import (SCALED_PROFILE_MARGIN, SCALED_PROFILE_MIN_TOKENS, extrapolate_peak_bytes,
                                 scaled_profile_tokens)
from tests.oracle.blip2 import build_tiny_blip2
from tests.oracle.llama import build_tiny_llama

MB = 1 << 20


def test_the_two_short_steps_are_a_sixteenth_and_an_eighth_in_whole_blocks():
    assert scaled_profile_tokens(512, 16) == (32, 64)
    assert scaled_profile_tokens(4096, 16) == (256, 512)
    assert scaled_profile_tokens(1000, 16) == (64, 128)  # 125 rounded up to whole pairs of blocks
    assert scaled_profile_tokens(512, 128) == (128, 256)  # at least two blocks
    assert scaled_profile_tokens(SCALED_PROFILE_MIN_TOKENS - 1, 16) is None  # short steps run whole
    assert scaled_profile_tokens(300, 128) is None  # the longer short step would be almost the whole one


def test_the_line_through_two_points_with_the_margin():
    # 10 MB at 32 tokens, 14 at 64: 1/8 MB a token, so 14 + 448 / 8 = 70 MB at 512, times the margin
    assert extrapolate_peak_bytes(0, (32, 10 * MB), (64, 14 * MB), 512) == int(70 * MB * SCALED_PROFILE_MARGIN)
    # a second reading below the first is noise, not memory given back: the line stays flat
    assert extrapolate_peak_bytes(0, (32, 10 * MB), (64, 9 * MB), 512) == int(9 * MB * SCALED_PROFILE_MARGIN)
    # the encoder's own peak, above all of the language model's, is the step's peak
    assert extrapolate_peak_bytes(500 * MB, (32, 10 * MB), (64, 14 * MB), 512) == 500 * MB


_CHILD = r"""
import json, sys
from fovea import LLM
from fovea.worker import model_runner

model_dir, mode, dtype = sys.argv[1:4]
if mode == "whole":
    model_runner.scaled_profile_tokens = lambda num_tokens, block_size: None
profile = model_runner.ModelRunner.profile_peak_bytes
seen = []

def spy(self, num_tokens, features):
    seen.append(profile(self, num_tokens, features))
    return seen[-1]

model_runner.ModelRunner.profile_peak_bytes = spy
LLM(model_dir, dtype=dtype, block_size=16, max_model_len=4096, max_num_seqs=8, num_threads=1)
print(json.dumps(seen))
"""


def _profile(model_dir: Path, mode: str, dtype: str) -> int:
    result = subprocess.run([sys.executable, "-c", _CHILD, str(model_dir), mode, dtype], capture_output=True,
                            text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    (peak,) = json.loads(result.stdout.strip().splitlines()[-1])
    return peak


@pytest.mark.parametrize("model, dtype", [
    ("blip2", "bfloat16"), pytest.param("llama", "float32", marks=pytest.mark.slow)])
def test_the_scaled_estimate_bounds_the_whole_step(tmp_path, model, dtype):
    # wide enough that a 4096-token step's activations (tens of MB) stand well above the allocator's noise;
    # BLIP-2 profiles with its worst-case image (the encoder part), Llama is text-only with grouped KV heads
    if model == "blip2":
        path = build_tiny_blip2(tmp_path / model, text_hidden=256, max_position_embeddings=4096)
    else:
        path = build_tiny_llama(tmp_path / model, hidden=256, max_position_embeddings=4096)
    whole = _profile(path, "whole", dtype)
    scaled = _profile(path, "scaled", dtype)
    assert whole > 16 * MB  # the control: the step's activations and KV writes are really measured
    assert whole <= scaled <= 3 * whole, (whole, scaled)

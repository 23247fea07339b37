"""The memory profiling pass through its view (each stack of like layers cut to its first and last layer of each
kind, fovea.worker.profile_view) against the whole step run as it is, each in a fresh process through a real
engine start: the estimate must never be below the whole step's reading (the KV cache would be sized into memory
the step needs), and not far above it. The view's cutting is checked exactly on small stacks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fovea.distributed.pipeline import PPMissingLayer
from fovea.worker.profile_view import SkippedLayer, layer_stacks, profile_view
from tests.oracle.blip2 import build_tiny_blip2
from tests.oracle.llama import build_tiny_llama

MB = 1 << 20


class Residual(nn.Module):
    """(x, residual) -> (x, residual), as Llama's decoder layers hand them on."""

    def __init__(self, width: int = 4, cross: bool = False):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.cross = nn.Linear(width, width) if cross else None

    def forward(self, x, residual, scale):
        residual = x if residual is None else x + residual
        return self.proj(residual) * scale, residual


class Plain(nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        return self.proj(x)


def test_a_stack_keeps_its_first_and_last_layer_of_each_kind():
    like = nn.ModuleList(Plain() for _ in range(6))
    alternating = nn.ModuleList(Residual(cross=i % 2 == 0) for i in range(8))  # the Q-Former's two kinds
    staged = nn.ModuleList([PPMissingLayer()] * 3 + [Plain() for _ in range(5)])  # a later pipeline stage
    model = nn.Module()
    model.like, model.alternating, model.staged = like, alternating, staged
    model.short = nn.ModuleList(Plain() for _ in range(2))  # too short to cut
    model.mixed = nn.ModuleList([Plain(), Plain(), Residual()])  # not one class: not a stack
    model.unlike = nn.ModuleList([Plain(4), Plain(6), Plain(8)])  # one class, no two alike (T5's sub-layers)
    stacks = {id(stack): (kept, skipped) for stack, kept, skipped in layer_stacks(model)}
    assert stacks == {id(like): ([0, 5], [1, 2, 3, 4]), id(alternating): ([0, 1, 6, 7], [2, 3, 4, 5]),
                      id(staged): ([3, 7], [4, 5, 6])}


def test_skipped_layers_hand_their_inputs_on_and_come_back():
    model = nn.Module()
    model.plain = nn.ModuleList(Plain() for _ in range(4))
    model.pairs = nn.ModuleList(Residual() for _ in range(4))
    originals = list(model.plain) + list(model.pairs)
    x = torch.randn(3, 4)
    with torch.no_grad(), profile_view(model) as skipped:
        assert [type(m) for m in model.plain] == [Plain, SkippedLayer, SkippedLayer, Plain]
        assert skipped == [originals[1], originals[2], originals[5], originals[6]]
        y = x
        for layer in model.plain:
            y = layer(y)
        assert torch.equal(y, model.plain[3](model.plain[0](x)))  # the middle two passed it on untouched
        h, residual = x, None
        for layer in model.pairs:
            h, residual = layer(h, residual, 2.0)
        first = model.pairs[0](x, None, 2.0)
        assert torch.equal(h, model.pairs[3](*first, 2.0)[0])
    assert list(model.plain) + list(model.pairs) == originals  # all back in place
    assert not model.pairs[0]._forward_hooks


def test_a_skipped_layer_before_its_stacks_first_kept_layer_is_an_error():
    model = nn.Module()
    model.plain = nn.ModuleList(Plain() for _ in range(3))
    with profile_view(model), pytest.raises(RuntimeError, match="before its stack's first kept layer"):
        model.plain[1](torch.zeros(1, 4))


_CHILD = r"""
import contextlib, json, sys
from fovea import LLM
from fovea.worker import model_runner

model_dir, mode, dtype = sys.argv[1:4]
view = model_runner.profile_view
skipped = []

@contextlib.contextmanager
def spy_view(model):
    if mode == "whole":
        yield []
        return
    with view(model) as left_out:
        skipped.extend(left_out)
        yield left_out

model_runner.profile_view = spy_view
profile = model_runner.ModelRunner.profile_peak_bytes
seen = []

def spy(self, num_tokens, features):
    seen.append(profile(self, num_tokens, features))
    return seen[-1]

model_runner.ModelRunner.profile_peak_bytes = spy
LLM(model_dir, dtype=dtype, block_size=16, max_model_len=4096, max_num_seqs=8, num_threads=1)
print(json.dumps([seen, len(skipped)]))
"""


def _profile(model_dir: Path, mode: str, dtype: str) -> tuple[int, int]:
    result = subprocess.run([sys.executable, "-c", _CHILD, str(model_dir), mode, dtype], capture_output=True,
                            text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    (peak,), num_skipped = json.loads(result.stdout.strip().splitlines()[-1])
    return peak, num_skipped


@pytest.mark.parametrize("model, dtype, num_skipped", [
    ("blip2", "bfloat16", 4 + 4 + 2), pytest.param("llama", "float32", 4, marks=pytest.mark.slow)])
def test_the_view_estimate_bounds_the_whole_step(tmp_path, model, dtype, num_skipped):
    # wide enough that a 4096-token step's activations (tens of MB) stand well above the allocator's noise, and
    # 6 layers a stack, so the view skips 4 of each: BLIP-2's ViT and OPT, and 2 of its Q-Former's (which
    # cross-attends every other layer: two kinds, each keeps its first and last), with its worst-case image;
    # Llama text-only with grouped KV heads
    if model == "blip2":
        path = build_tiny_blip2(tmp_path / model, text_hidden=256, max_position_embeddings=4096, num_layers=6,
                                cross_attention_frequency=2)
    else:
        path = build_tiny_llama(tmp_path / model, hidden=256, max_position_embeddings=4096, num_layers=6)
    whole, none_skipped = _profile(path, "whole", dtype)
    estimate, skipped = _profile(path, "view", dtype)
    assert (none_skipped, skipped) == (0, num_skipped)
    assert whole > 16 * MB  # the control: the step's activations are really measured
    print(f"whole step {whole / MB:.1f} MB, the view's estimate {estimate / MB:.1f} MB")
    assert whole <= estimate <= 3 * whole, (whole, estimate)


def test_a_one_token_step_is_profiled_whole_so_llama_keeps_its_decode_plan(tmp_path):
    # a 1-token worst-case step is a decode step: through the view, Llama would decide its fused decode plan on
    # the view's layers (no plan, for good); run whole it decides on its own layers
    from fovea import LLM

    path = build_tiny_llama(tmp_path / "llama", hidden=64, num_layers=4)
    llm = LLM(str(path), dtype="bfloat16", max_model_len=64, enable_chunked_prefill=True, max_num_batched_tokens=1,
              num_threads=1)
    model = llm.llm_engine.engine_core.executor._runner.model
    assert model.model._decode_plan is not False

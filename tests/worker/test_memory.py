"""KV sizing measures what the profiling pass itself allocates, even after the process peaked higher before it
(loading and prepacking weights do: their temporary copies are freed again). `ru_maxrss`, the process-lifetime
peak, reads ~0 for such a pass; the measure here must not."""
from __future__ import annotations

import resource
import time

import pytest
import torch
import transformers

from fovea.config import EngineConfig
from fovea.models.qwen2 import Qwen2ForCausalLM
from fovea.worker import memory
from fovea.worker.model_runner import ModelRunner
from tests.oracle.qwen2_5_vl import build_tiny_qwen2

MB = 1 << 20
WORK_BYTES = 96 * MB


def raise_the_lifetime_peak() -> None:
    """Touch 384 MB and free it again (large blocks are mmapped, so the resident set drops back)."""
    big = torch.ones(384 * MB // 4)
    del big


def allocate_and_hold() -> int:
    block = torch.ones(WORK_BYTES // 4)  # touched: resident
    time.sleep(0.05)  # long enough for the sampling fallback to see it
    return int(block[0])


def ru_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.mark.parametrize("can_reset_peak", [True, False])
def test_work_is_measured_even_below_an_earlier_peak(monkeypatch, can_reset_peak):
    if not can_reset_peak:
        monkeypatch.setattr(memory, "_reset_peak_rss", lambda: False)
    raise_the_lifetime_peak()
    before = ru_maxrss_bytes()
    result, used = memory.measure_peak_bytes(allocate_and_hold)
    assert result == 1
    assert ru_maxrss_bytes() - before < WORK_BYTES // 2  # the old reading: the earlier peak hides the work
    assert WORK_BYTES * 0.9 <= used <= WORK_BYTES + 64 * MB


def test_the_profiling_pass_counts_what_it_allocates(tmp_path, monkeypatch):
    path = str(build_tiny_qwen2(tmp_path / "qwen2", seed=0))
    runner = ModelRunner(EngineConfig(model=path, dtype="float32", block_size=4),
                         transformers.AutoConfig.from_pretrained(path), Qwen2ForCausalLM)
    compute_logits = runner.model.compute_logits

    def large_vocabulary_logits(hidden):  # what a 150k-token vocabulary would allocate for the sampled rows
        logits = compute_logits(hidden)
        return logits, torch.ones(WORK_BYTES // 4)

    monkeypatch.setattr(runner.model, "compute_logits", large_vocabulary_logits)
    raise_the_lifetime_peak()
    assert runner.profile_peak_bytes(64, []) >= WORK_BYTES * 0.9
    assert all(layer.kv_cache is None for layer in runner.attention_layers)  # the pass leaves nothing behind


def test_a_lazily_zeroed_pool_is_zeros_and_costs_memory_only_where_written():
    """The KV pool: allocating 512 MB adds next to nothing to the resident set; reading it gives zeros; what is
    written becomes resident; the mapping goes with the last tensor viewing it."""
    def vm_size() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))

    before, size_before = memory.current_rss_bytes(), vm_size()
    pool = memory.lazily_zeroed((1 << 14, 8, 1024), torch.float32)  # 512 MB
    assert pool.shape == (1 << 14, 8, 1024) and pool.dtype == torch.float32
    assert memory.current_rss_bytes() - before < 16 * MB
    assert vm_size() - size_before >= 512 * MB
    assert pool[::97].abs().max() == 0 and pool[-1].abs().max() == 0
    pool[: 1 << 11] = 1.0  # 64 MB written
    assert 60 * MB <= memory.current_rss_bytes() - before <= 96 * MB
    assert pool.sum() == (1 << 11) * 8 * 1024
    view = pool[5]
    del pool
    assert vm_size() - size_before >= 512 * MB  # a view keeps it
    del view
    assert vm_size() - size_before < 64 * MB
    small = memory.lazily_zeroed((4, 4), torch.bfloat16)
    assert torch.equal(small, torch.zeros(4, 4, dtype=torch.bfloat16))

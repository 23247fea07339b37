"""The paged attention layer's prefill groups on fovea's causal kernel: whole prompts (in runs of adjacent rows, one
call per run) and chunks after cached context (gathered blocks), in steps mixed with decodes; equal to what the
kernel computes on each request alone, as close to float64 as the SDPA path, and SDPA where the kernel must not run
(float32, a position bias)."""
from __future__ import annotations

import pytest
import torch

from fovea.kernels import encoder_attention as attention_kernel
from fovea.layers import prefill_attention
from fovea.layers.attention import Attention, build_attention_metadata, forward_context
from tests.kernels import requires_compiler
from tests.layers import causal_attention_float64

pytestmark = [
    requires_compiler,
    pytest.mark.skipif(not attention_kernel.available(), reason="no AVX-512 BF16 on this CPU"),
]

H, KV, D, BS = 14, 2, 64, 16  # Qwen2-0.5B's heads


def _layer(dtype, use_kernel=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    attn = Attention(H, D, D**-0.5, KV, use_kernel=use_kernel)
    num_blocks = 64
    # stale garbage in the pool: only written slots may influence the result
    attn.kv_cache = tuple((torch.randn(num_blocks * BS, KV, D, generator=gen) * 100).to(dtype) for _ in range(2))
    return attn


def _run_step(attn, seqs, done, now, tables, dtype):
    """One step: request i computes tokens done[i] .. done[i] + now[i] (0: not scheduled). -> {i: [now[i], H, D]}."""
    active = [i for i, n in enumerate(now) if n]
    meta = build_attention_metadata([now[i] for i in active], [done[i] + now[i] for i in active],
                                    [tables[i] for i in active], BS)
    # q, k, v as views of one packed projection, as the decoder layers hand them over
    qkv = torch.cat([torch.cat([t[done[i]:done[i] + now[i]].flatten(1) for t in seqs[i]], 1) for i in active])
    qkv = qkv.to(dtype)
    q, k, v = qkv.split([H * D, KV * D, KV * D], dim=1)
    with forward_context(meta):
        out = attn(q, k, v)
    rows, first = {}, 0
    for i in active:
        rows[i] = out[first:first + now[i]].view(now[i], H, D)
        first += now[i]
    return rows


def _requests(lengths, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(n, h, D, generator=gen) for h in (H, KV, KV)) for n in lengths]


def test_prefill_steps_run_the_kernel_per_request_bits_and_stay_near_float64():
    lengths = [40, 34, 70, 5, 20]
    seqs = _requests(lengths)
    tables = [list(range(1 + 6 * i, 7 + 6 * i)) for i in range(len(lengths))]
    attn, sdpa_attn = _layer(torch.bfloat16), _layer(torch.bfloat16, use_kernel=False)
    done = [0] * len(lengths)
    # step 1: whole prompts 0, 1 and 3, and request 2's first chunk (no context yet: a whole prompt so far), one run
    # step 2: request 1 decodes, request 2 continues after 30 cached tokens, request 4 starts
    # step 3: request 2's last chunk after 60 tokens, request 4 continues after its first 12, request 1 decodes
    plan = [[40, 33, 30, 5, 0], [0, 1, 30, 0, 12], [0, 0, 10, 0, 8]]
    got, want = [[] for _ in lengths], [[] for _ in lengths]
    for now in plan:
        kernel_rows = _run_step(attn, seqs, done, now, tables, torch.bfloat16)
        sdpa_rows = _run_step(sdpa_attn, seqs, done, now, tables, torch.bfloat16)
        for i, n in enumerate(now):
            if not n:
                continue
            got[i].append(kernel_rows[i])
            want[i].append(sdpa_rows[i])
            # the same rows from the kernel on this request alone: a whole prompt over its own keys, a chunk over
            # its cached context + itself
            q, k, v = (t[:done[i] + n].bfloat16() for t in seqs[i])
            alone = attention_kernel.attention(q[done[i]:].contiguous(), k, v, torch.tensor([0, n]),
                                               torch.tensor([0, done[i] + n]), D**-0.5, causal=True)
            if n > 1:  # a one-token row is a decode group's: the paged decode kernel's
                assert torch.equal(kernel_rows[i], alone), (now, i)
            done[i] += n
    for i, n in enumerate(lengths):
        exact = causal_attention_float64(*(t.bfloat16() for t in seqs[i]))
        err = (torch.cat(got[i]).double() - exact).abs()
        sdpa_err = (torch.cat(want[i]).double() - exact).abs()
        assert err.mean() <= 1.1 * sdpa_err.mean() + 1e-12 and err.max() <= sdpa_err.max() + 2**-8 * exact.abs().max()


def test_a_prefill_only_step_is_one_kernel_call_per_layer(monkeypatch):
    calls = []
    real = attention_kernel.attention
    monkeypatch.setattr(attention_kernel, "attention", lambda *a, **kw: calls.append(a[3]) or real(*a, **kw))
    seqs = _requests([30, 2, 17])
    tables = [[1, 2], [3], [4, 5]]
    _run_step(_layer(torch.bfloat16), seqs, [0, 0, 0], [30, 2, 17], tables, torch.bfloat16)
    assert len(calls) == 1 and calls[0].tolist() == [0, 30, 32, 49]
    # a one-token prompt is a decode group (the paged decode kernel's) between two runs of whole prompts
    calls.clear()
    out = _run_step(_layer(torch.bfloat16), seqs, [0, 0, 0], [30, 1, 17], tables, torch.bfloat16)
    assert [c.tolist() for c in calls] == [[0, 30], [0, 17]]
    assert torch.equal(out[1][0], seqs[1][2][0].bfloat16().repeat_interleave(H // KV, 0))


def test_float32_and_position_bias_stay_on_sdpa(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the kernel ran")
    monkeypatch.setattr(attention_kernel, "attention", refuse)
    seqs = _requests([20, 9])
    out = _run_step(_layer(torch.float32), seqs, [0, 0], [20, 9], [[1, 2], [3]], torch.float32)
    exact = causal_attention_float64(*seqs[0])
    assert (out[0].double() - exact).abs().max() < 1e-5
    # a position bias (T5's): additive scores holding the causal mask, one tensor per group
    attn = _layer(torch.bfloat16)
    meta = build_attention_metadata([20], [20], [[1, 2]], BS)
    q, k, v = (t.flatten(1).bfloat16() for t in seqs[0])
    bias = torch.zeros(1, H, 20, 2 * BS).masked_fill(torch.ones(20, 2 * BS, dtype=torch.bool).triu(1), float("-inf"))
    with forward_context(meta):
        biased = attn(q, k, v, [bias])
    assert (biased.view(20, H, D).double() - exact).abs().max() < 3e-2


def test_fresh_runs_join_adjacent_prompts_only():
    assert prefill_attention.fresh_runs([(31, 5), (0, 10), (10, 20), (36, 2)]) == [(0, [10, 20]), (31, [5, 2])]
    assert prefill_attention.fresh_runs([]) == []

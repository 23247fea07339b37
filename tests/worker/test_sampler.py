from __future__ import annotations

import math

import pytest
import torch

from fovea.outputs import CompletionOutput, Logprob, RequestOutput
from fovea.sampling_params import SamplingParams
from fovea.worker.sampler import (Sampler, SamplingMetadata, SamplingRow, apply_penalties, compute_probs,
                                  seeded_generator)

NEG_INF = float("-inf")


def _row(prompt=(), output=(), eos=None, generator=None, **kwargs) -> SamplingRow:
    params = SamplingParams(**kwargs)
    if params.seed is not None and generator is None:
        generator = seeded_generator(params.seed)
    return SamplingRow(params, list(prompt), list(output), generator, eos)


def _meta(rows, vocab_size):
    return SamplingMetadata.build(rows, vocab_size)


def _softmax(xs):
    m = max(x for x in xs if x != NEG_INF)
    e = [0.0 if x == NEG_INF else math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


# ---------------------------------------------------------------- greedy


def test_greedy_is_argmax_and_fast_path():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    meta = _meta([_row(temperature=0.0) for _ in range(4)], 50)
    assert meta.all_greedy and meta.no_penalties and meta.max_num_logprobs is None
    out = Sampler()(logits, meta)
    assert out.sampled_token_ids.tolist() == logits.argmax(-1).tolist()
    assert out.logprobs is None


def test_greedy_fast_path_on_bfloat16_logits_takes_the_first_of_tied_maxima():
    # bfloat16 ties are common at a large vocabulary; the fast path reads the logits as they are
    logits = torch.zeros(3, 151936, dtype=torch.bfloat16)
    logits[0, [7, 90000, 151935]] = 2.5  # three tied maxima
    logits[1, 151935] = 1.0
    logits[2] = torch.randn(151936, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    out = Sampler()(logits, _meta([_row(temperature=0.0) for _ in range(3)], 151936))
    assert out.sampled_token_ids.tolist() == [7, 151935, logits[2].float().argmax().item()]
    assert out.sampled_token_ids.tolist() == logits.float().argmax(-1).tolist()


def test_greedy_rows_in_a_mixed_batch_are_argmax_and_inputs_untouched():
    torch.manual_seed(1)
    logits = torch.randn(3, 30)
    before = logits.clone()
    rows = [_row(temperature=0.0), _row(temperature=1.5, top_k=5), _row(temperature=0.0, logprobs=2)]
    out = Sampler()(logits, _meta(rows, 30))
    ids = out.sampled_token_ids.tolist()
    assert ids[0] == logits[0].argmax().item() and ids[2] == logits[2].argmax().item()
    assert ids[1] in logits[1].topk(5).indices.tolist()
    assert torch.equal(logits, before)


def test_low_precision_logits():
    torch.manual_seed(2)
    logits = torch.randn(2, 40).to(torch.bfloat16)
    out = Sampler()(logits, _meta([_row(temperature=0.0, logprobs=1), _row(seed=3)], 40))
    assert out.sampled_token_ids[0].item() == logits[0].float().argmax().item()
    assert out.logprobs.logprobs.dtype == torch.float32


# ---------------------------------------------------------------- processed distribution


LOGITS = [math.log(p) for p in (0.05, 0.5, 0.1, 0.25, 0.02, 0.08)]  # probs at temperature 1


def _expected(logits, temperature=1.0, min_p=0.0, top_k=0, top_p=1.0):
    """The formula, written out on plain floats: scale, then each filter on the renormalised result."""
    x = [v / temperature for v in logits]
    p = _softmax(x)
    x = [NEG_INF if pi < min_p * max(p) else xi for xi, pi in zip(x, p)]
    if top_k:
        kth = sorted(x, reverse=True)[top_k - 1]
        x = [NEG_INF if xi < kth else xi for xi in x]
    if top_p < 1.0:
        p = _softmax(x)
        order = sorted(range(len(x)), key=lambda i: -p[i])
        mass = 0.0
        for i in order:
            if mass >= top_p:
                x[i] = NEG_INF
            mass += p[i]
    return _softmax(x)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(temperature=0.5),
    dict(temperature=2.0),
    dict(top_k=2),
    dict(top_k=1),
    dict(top_p=0.7),
    dict(top_p=0.8),  # 0.5 + 0.25 < 0.8 -> the 0.1 token is also kept
    dict(top_p=1e-60),  # 0 in float32: the most likely token still stays (it crashed the engine before)
    dict(min_p=0.25),
    dict(min_p=0.15),  # threshold 0.075: 0.08 stays, 0.05 goes
    dict(temperature=0.7, top_k=4, top_p=0.9),
    dict(temperature=1.3, min_p=0.1, top_k=5, top_p=0.85),
])
def test_processed_probs_match_the_formula(kwargs):
    rows = [_row(**kwargs), _row(temperature=0.9, top_k=3, top_p=0.5, min_p=0.3)]  # a neighbour with other values
    logits = torch.tensor([LOGITS, LOGITS[::-1]])
    probs = compute_probs(logits, _meta(rows, 6))
    expected = _expected(LOGITS, **{k: v for k, v in kwargs.items()})
    assert probs[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert probs[1].tolist() == pytest.approx(_expected(LOGITS[::-1], 0.9, 0.3, 3, 0.5), abs=1e-6)


@pytest.mark.parametrize("with_unfiltered_row", [False, True])
def test_filters_on_a_large_vocabulary(with_unfiltered_row):
    """Nuclei far larger than the candidate set (flat rows) take the sorting path; compare each row with the
    formula. A row with top_p but no top_k makes the whole batch search the general candidates."""
    torch.manual_seed(3)
    vocab = 1500
    logits = torch.cat([torch.randn(3, vocab) * 0.2, torch.randn(3, vocab) * 4])  # 3 flat rows, 3 peaked
    options = [dict(top_p=0.9, top_k=1000), dict(top_p=0.5, top_k=900, min_p=0.7), dict(top_k=700),
               dict(top_p=0.9, top_k=40), dict(top_p=0.6, temperature=0.5, top_k=300), dict(min_p=0.01)]
    if with_unfiltered_row:
        options[2] = dict(top_p=0.95)
    probs = compute_probs(logits, _meta([_row(**o) for o in options], vocab))
    for i, o in enumerate(options):
        expected = _expected(logits[i].tolist(), **o)
        assert probs[i].tolist() == pytest.approx(expected, abs=1e-6), (i, o)


def test_top_k_keeps_ties_with_the_kth():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]])
    probs = compute_probs(logits, _meta([_row(top_k=2)], 5))[0]
    assert (probs > 0).tolist() == [False, True, True, True, False]


def test_draws_follow_the_distribution():
    torch.manual_seed(1234)
    num_draws = 20000
    logits = torch.tensor([LOGITS] * num_draws)
    rows = [_row(temperature=0.8, top_k=4, top_p=0.9)] * num_draws
    meta = _meta(rows, 6)
    ids = Sampler()(logits, meta).sampled_token_ids
    counts = torch.bincount(ids, minlength=6).double() / num_draws
    expected = torch.tensor(_expected(LOGITS, temperature=0.8, top_k=4, top_p=0.9), dtype=torch.float64)
    sigma = (expected * (1 - expected) / num_draws).sqrt()
    assert torch.all((counts - expected).abs() <= 5 * sigma + 1e-12), (counts, expected)
    assert counts[expected == 0].sum() == 0


# ---------------------------------------------------------------- penalties and min_tokens


def test_penalties_hand_worked_on_six_tokens():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 1.0, 0.0]] * 4)
    prompt, output = [0, 1], [2, 2, 3]
    rows = [
        _row(prompt, output, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
        _row(prompt, output, presence_penalty=0.5, frequency_penalty=0.25),  # prompt tokens not penalised
        _row(prompt, output, repetition_penalty=2.0),
        _row(prompt, output),
    ]
    got = apply_penalties(logits, _meta(rows, 6))
    # repetition over {0,1,2,3}: 2/2, -1*2, 0.5/2, -0.5*2; then -0.25*count and -0.5 for tokens 2 (x2) and 3 (x1)
    assert got[0].tolist() == pytest.approx([1.0, -2.0, 0.25 - 0.5 - 0.5, -1.0 - 0.25 - 0.5, 1.0, 0.0])
    assert got[1].tolist() == pytest.approx([2.0, -1.0, 0.5 - 0.5 - 0.5, -0.5 - 0.25 - 0.5, 1.0, 0.0])
    assert got[2].tolist() == pytest.approx([1.0, -2.0, 0.25, -1.0, 1.0, 0.0])
    assert got[3].tolist() == logits[3].tolist()


def test_penalties_ignore_ids_outside_the_logits():
    logits = torch.tensor([[1.0, 1.0, 1.0]])
    rows = [_row([0, 7, -1], [9], repetition_penalty=2.0, presence_penalty=1.0)]  # e.g. a placeholder id
    assert apply_penalties(logits, _meta(rows, 3)).tolist() == [[0.5, 1.0, 1.0]]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 9.0, 8.0]] * 4)
    rows = [
        _row(output=[1, 1], eos=5, temperature=0.0, min_tokens=3, stop_token_ids=[4], logprobs=0),
        _row(output=[1, 1, 1], eos=5, temperature=0.0, min_tokens=3, stop_token_ids=[4]),  # reached
        _row(output=[], eos=5, temperature=0.0, min_tokens=1, ignore_eos=True),  # EOS masked anyway, as vLLM
        _row(output=[], eos=4, temperature=0.0),
    ]
    out = Sampler()(logits, _meta(rows, 6))
    assert out.sampled_token_ids.tolist() == [3, 4, 4, 4]
    # logprobs see the raw logits, not the mask
    assert out.logprobs.logprobs[0, 0].item() == pytest.approx(torch.log_softmax(logits[0], -1)[3].item())
    assert out.logprobs.sampled_token_ranks[0].item() == 3


# ---------------------------------------------------------------- seeds


def _run(rows_per_step, logits_per_step):
    sampler = Sampler()
    return [sampler(logits, _meta(rows, logits.shape[1])).sampled_token_ids.tolist()
            for rows, logits in zip(rows_per_step, logits_per_step)]


def test_seeded_row_is_the_same_alone_and_anywhere_in_a_batch():
    vocab, steps = 64, 12
    torch.manual_seed(0)
    own = [torch.randn(vocab) for _ in range(steps)]
    options = dict(temperature=0.9, top_p=0.95, seed=1234)

    alone_rows = _row(**options)
    alone = [ids[0] for ids in _run([[alone_rows]] * steps, [x.unsqueeze(0) for x in own])]

    for position in (0, 3):
        seeded = _row(**options)  # a fresh generator for the same seed
        others = [_row(), _row(seed=99), _row(temperature=0.0), _row(temperature=1.2, top_k=10)]
        rows = others[:position] + [seeded] + others[position:]
        logits = []
        for x in own:
            batch = torch.randn(5, vocab) * 3
            batch[position] = x
            logits.append(batch)
        batched = [ids[position] for ids in _run([rows] * steps, logits)]
        assert batched == alone, position

    other_seed = [ids[0] for ids in _run([[_row(**{**options, "seed": 4321})]] * steps, [x.unsqueeze(0) for x in own])]
    assert other_seed != alone


def test_seed_without_generator_is_an_error():
    row = SamplingRow(SamplingParams(seed=1), [], [], None, None)
    with pytest.raises(ValueError, match="generator"):
        SamplingMetadata.build([row], 10)


# ---------------------------------------------------------------- logprobs


def test_logprobs_come_from_raw_logits_with_ranks():
    torch.manual_seed(5)
    vocab = 20
    logits = torch.randn(5, vocab) * 2
    rows = [
        _row([1, 2], [3, 3], temperature=0.3, repetition_penalty=1.8, frequency_penalty=1.0, logprobs=3),
        _row(temperature=0.0, logprobs=0),
        _row(logprobs=None),
        _row(temperature=2.0, top_k=8, min_p=0.05, logprobs=5, seed=7),
        _row(temperature=0.0, presence_penalty=2.0, output=[int(logits[4].argmax())], logprobs=2),
    ]
    meta = _meta(rows, vocab)
    assert meta.max_num_logprobs == 5
    out = Sampler()(logits, meta)
    raw = torch.log_softmax(logits, dim=-1)
    sampled = out.sampled_token_ids.tolist()
    lp = out.logprobs
    assert lp.token_ids.shape == (5, 6) and lp.logprobs.shape == (5, 6)
    for i in range(5):
        assert lp.token_ids[i, 0].item() == sampled[i]
        assert lp.logprobs[i, 0].item() == pytest.approx(raw[i, sampled[i]].item(), abs=1e-6)
        assert lp.sampled_token_ranks[i].item() == int((raw[i] > raw[i, sampled[i]]).sum()) + 1
        top = raw[i].topk(5)
        assert lp.token_ids[i, 1:].tolist() == top.indices.tolist()
        assert lp.logprobs[i, 1:].tolist() == pytest.approx(top.values.tolist(), abs=1e-6)
    # the penalised greedy row picked something other than the raw argmax, and its rank says so
    assert sampled[4] != int(logits[4].argmax()) and lp.sampled_token_ranks[4].item() > 1

    dicts = lp.to_dicts()
    assert dicts[2] is None
    assert list(dicts[1]) == [sampled[1]]  # logprobs=0: the sampled token only
    assert dicts[1][sampled[1]] == Logprob(pytest.approx(raw[1, sampled[1]].item(), abs=1e-6), 1, None)
    for i, k in ((0, 3), (3, 5), (4, 2)):
        d = dicts[i]
        assert next(iter(d)) == sampled[i]
        top_ids = raw[i].topk(k).indices.tolist()
        assert set(d) == set(top_ids) | {sampled[i]}
        for rank, token_id in enumerate(top_ids, start=1):
            if token_id != sampled[i]:
                assert d[token_id].rank == rank
        assert all(v.decoded_token is None for v in d.values())


def test_output_objects():
    done = CompletionOutput(0, "a cat", [5, 6], -1.5, [{5: Logprob(-0.5, 1, "a")}, {6: Logprob(-1.0, 2, " cat")}],
                            "stop", "</s>")
    running = CompletionOutput(1, "a", [5])
    assert done.finished() and not running.finished()
    out = RequestOutput("7", "prompt", [1, 2], [done, running], finished=False)
    assert out.num_cached_tokens is None and out.prompt_logprobs is None
    text = repr(out)
    assert text.startswith("RequestOutput(request_id='7', prompt='prompt'") and "text='a cat'" in text
    assert "finish_reason=stop, stop_reason='</s>'" in text and "Logprob(logprob=-0.5, rank=1" in text

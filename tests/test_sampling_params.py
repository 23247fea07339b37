from __future__ import annotations

import dataclasses
import math

import pytest

from fovea.sampling_params import SamplingParams


def test_defaults_are_vllms():
    p = SamplingParams()
    expected = dict(n=1, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=None, max_tokens=16, min_tokens=0,
                    stop=[], stop_token_ids=[], ignore_eos=False, logprobs=None, repetition_penalty=1.0,
                    presence_penalty=0.0, frequency_penalty=0.0, skip_special_tokens=True,
                    spaces_between_special_tokens=True, include_stop_str_in_output=False, prompt_logprobs=None,
                    structured_outputs=None)
    assert dataclasses.asdict(p) == expected
    assert not p.is_greedy


def test_normalisation():
    p = SamplingParams(stop="###", stop_token_ids=[7, 3, 7], top_k=-1, seed=-1, max_tokens=None)
    assert p.stop == ["###"] and p.stop_token_ids == [7, 3] and p.top_k == 0 and p.seed is None
    assert p.max_tokens is None
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(logprobs=True).logprobs == 1


def test_greedy_epsilon():
    assert SamplingParams(temperature=0.0).is_greedy and SamplingParams(temperature=9e-6).is_greedy
    assert not SamplingParams(temperature=1e-4).is_greedy and not SamplingParams(seed=3).is_greedy
    assert SamplingParams(temperature=0.0, seed=3).is_greedy
    # greedy ignores the filters, so they are reset
    p = SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.2)
    assert (p.top_p, p.top_k, p.min_p) == (1.0, 0, 0.0)


def test_clone_is_independent():
    p = SamplingParams(stop=["x"], stop_token_ids=[1], seed=5)
    q = p.clone()
    assert q == p and q is not p
    q.stop.append("y")
    q.stop_token_ids.append(2)
    assert p.stop == ["x"] and p.stop_token_ids == [1]


def test_unknown_keyword_is_type_error():
    with pytest.raises(TypeError, match="best_off"):
        SamplingParams(best_off=2)


@pytest.mark.parametrize("kwargs, needles", [
    (dict(n=0), ["n must be", "0", ">= 1"]),
    (dict(n=1.5), ["n must be", "1.5"]),
    (dict(temperature=-0.5), ["temperature", "-0.5", ">= 0"]),
    (dict(temperature=math.inf), ["temperature", "inf", "finite"]),
    (dict(temperature=math.nan), ["temperature", "nan"]),
    (dict(top_p=0.0), ["top_p", "0.0", "(0, 1]"]),
    (dict(top_p=1.01), ["top_p", "1.01", "(0, 1]"]),
    (dict(top_k=-2), ["top_k", "-2", "0 or -1"]),
    (dict(top_k=2.5), ["top_k", "2.5"]),
    (dict(min_p=-0.1), ["min_p", "-0.1", "[0, 1]"]),
    (dict(min_p=1.5), ["min_p", "1.5", "[0, 1]"]),
    (dict(max_tokens=0), ["max_tokens", "0", ">= 1"]),
    (dict(min_tokens=-1), ["min_tokens", "-1", ">= 0"]),
    (dict(min_tokens=5, max_tokens=4), ["min_tokens", "max_tokens=4", "5"]),
    (dict(presence_penalty=2.5), ["presence_penalty", "2.5", "[-2, 2]"]),
    (dict(frequency_penalty=-3.0), ["frequency_penalty", "-3.0", "[-2, 2]"]),
    (dict(repetition_penalty=0.0), ["repetition_penalty", "0.0", "> 0"]),
    (dict(repetition_penalty=-1.0), ["repetition_penalty", "-1.0", "> 0"]),
    (dict(repetition_penalty=1.5e308), ["repetition_penalty", "1.5e+308", "float32"]),  # inf in float32: 0 * inf
    (dict(repetition_penalty=1e-300), ["repetition_penalty", "1e-300", "float32"]),
    (dict(logprobs=-1), ["logprobs", "-1", ">= 0"]),
    (dict(stop=["ok", ""]), ["stop", "''", "non-empty"]),
    (dict(stop=""), ["stop", "non-empty"]),
    (dict(stop_token_ids=[1, "2"]), ["stop_token_ids", "'2'", "integers"]),
    (dict(stop_token_ids=[1.0]), ["stop_token_ids", "1.0", "integers"]),
    (dict(seed=1.5), ["seed", "1.5"]),
    (dict(temperature=0.0, n=2), ["n must be 1", "greedily", "n=2"]),
])
def test_invalid_values_name_field_value_and_rule(kwargs, needles):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    message = str(info.value)
    for needle in needles:
        assert needle in message, (needle, message)


def test_boundaries_are_accepted():
    SamplingParams(top_p=1.0, min_p=1.0, top_k=1, presence_penalty=-2.0, frequency_penalty=2.0,
                   repetition_penalty=0.01, logprobs=0, min_tokens=4, max_tokens=4, temperature=0.0)


def test_seed_is_a_64_bit_signed_integer():
    assert SamplingParams(seed=2**63 - 1).seed == 2**63 - 1 and SamplingParams(seed=-(2**63)).seed == -(2**63)
    for seed in (2**63, -(2**63) - 1, -71437687332381564928):  # the last one a fuzzer sent the server
        with pytest.raises(ValueError, match=r"seed must be an integer in \[-9223372036854775808, "):
            SamplingParams(seed=seed)

"""OutputProcessor on hand-made RequestUpdates: n > 1 fan-out and gathering, finish reasons, stop strings handed
back to the core, logprobs decoded and summed, aborts returning the sequences to stop."""
from __future__ import annotations

import pytest

from fovea.engine.output_processor import OutputProcessor, fan_out
from fovea.engine.request import Request, RequestStatus
from fovea.engine.scheduler import RequestUpdate
from fovea.outputs import Logprob
from fovea.sampling_params import SamplingParams
from tests.oracle.tokenizer import build_tokenizer

RUNNING, STOPPED, LENGTH = RequestStatus.RUNNING, RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def add(processor: OutputProcessor, request_id: str, params: SamplingParams, prompt=(5, 6, 7)) -> list[Request]:
    request = Request(request_id, list(prompt), params, prompt="a prompt")
    sequences = fan_out(request)
    processor.add_request(request, sequences)
    return sequences


def update(rid, tokens, status=RUNNING, stop_reason=None, logprobs=None, cached=0) -> RequestUpdate:
    return RequestUpdate(rid, list(tokens), status.is_finished, status, stop_reason, logprobs, cached)


def test_fan_out_gives_children_their_own_params_and_seeds():
    params = SamplingParams(n=3, temperature=1.0, seed=10, max_tokens=4)
    request = Request("r", [1, 2], params, eos_token_id=9, mrope_position_delta=2)
    children = fan_out(request)
    assert [c.request_id for c in children] == ["0_r", "1_r", "2_r"]
    assert [c.sampling_params.seed for c in children] == [10, 11, 12]
    assert all(c.sampling_params.n == 1 and c.eos_token_id == 9 and c.mrope_position_delta == 2 for c in children)
    assert params.n == 3 and params.seed == 10  # the caller's params are left alone
    single = Request("s", [1], SamplingParams())
    assert fan_out(single) == [single]


def test_children_gather_into_one_output_finished_when_all_are(tokenizer):
    processor = OutputProcessor(tokenizer)
    add(processor, "r", SamplingParams(n=2, temperature=1.0, max_tokens=2))
    outputs, stopped = processor.process_updates([update("0_r", [40], cached=16), update("1_r", [41])])
    (out,) = outputs
    assert stopped == [] and not out.finished and out.num_cached_tokens == 16
    assert [c.token_ids for c in out.outputs] == [[40], [41]] and out.prompt_token_ids == [5, 6, 7]
    outputs, _ = processor.process_updates([update("0_r", [42], LENGTH)])
    assert not outputs[0].finished and [c.finish_reason for c in outputs[0].outputs] == ["length", None]
    outputs, _ = processor.process_updates([update("1_r", [43], STOPPED, stop_reason=43)])
    (out,) = outputs
    assert out.finished and [(c.finish_reason, c.stop_reason) for c in out.outputs] == [("length", None),
                                                                                      ("stop", 43)]
    assert out.outputs[0].text == tokenizer.decode([40, 42]) and "r" not in processor
    assert processor.process_updates([update("0_r", [1])]) == ([], [])  # late updates of a finished request


def test_a_stop_string_finishes_the_sequence_and_is_handed_back(tokenizer):
    processor = OutputProcessor(tokenizer)
    ids = tokenizer.encode("a dog runs on the grass", add_special_tokens=False)
    stop_at = next(i for i in range(len(ids)) if "dog" in tokenizer.decode(ids[:i + 1]))
    add(processor, "r", SamplingParams(temperature=0.0, stop=["dog"], max_tokens=50))
    stopped = []
    for i in range(stop_at + 1):
        outputs, stopped = processor.process_updates([update("r", [ids[i]])])
    (out,) = outputs
    assert stopped == ["r"] and out.finished and "r" not in processor
    assert (out.outputs[0].finish_reason, out.outputs[0].stop_reason) == ("stop", "dog")
    assert out.outputs[0].text == tokenizer.decode(ids[:stop_at + 1]).split("dog")[0]


def test_logprobs_are_decoded_and_summed(tokenizer):
    processor = OutputProcessor(tokenizer)
    add(processor, "r", SamplingParams(temperature=0.0, logprobs=1, max_tokens=2))
    entry = {40: Logprob(-0.5, 1), 41: Logprob(-1.5, 2)}
    processor.process_updates([update("r", [40], logprobs=[entry])])
    (out,), _ = processor.process_updates([update("r", [41], LENGTH, logprobs=[{41: Logprob(-0.25, 1)}])])
    completion = out.outputs[0]
    assert completion.cumulative_logprob == pytest.approx(-0.75)
    assert [list(e) for e in completion.logprobs] == [[40, 41], [41]]
    assert completion.logprobs[0][41].decoded_token == tokenizer.decode([41])


def test_abort_returns_every_sequence_of_the_request(tokenizer):
    processor = OutputProcessor(tokenizer)
    add(processor, "a", SamplingParams(n=3, temperature=1.0))
    add(processor, "b", SamplingParams())
    assert processor.abort_requests(["a", "unknown"]) == ["0_a", "1_a", "2_a"]
    assert processor.get_num_unfinished_requests() == 1 and processor.abort_requests(["b"]) == ["b"]
    assert processor.process_updates([update("1_a", [5])]) == ([], [])

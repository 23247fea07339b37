"""Request models -> SamplingParams, logprob shapes, and the streaming cursor, without a server."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from fovea.entrypoints.openai import protocol as p
from fovea.entrypoints.openai import streaming
from fovea.outputs import CompletionOutput, Logprob
from fovea.sampling_params import SamplingParams

MESSAGES = [{"role": "user", "content": "hi"}]


def test_chat_request_maps_to_sampling_params():
    body = p.ChatCompletionRequest(messages=MESSAGES, max_tokens=5, max_completion_tokens=9, temperature=0.5,
                                   top_k=3, logprobs=True, top_logprobs=4, stop="x", seed=7, ignore_eos=True,
                                   some_future_field=1)
    params = body.to_sampling_params()
    assert (params.max_tokens, params.temperature, params.top_k, params.logprobs) == (9, 0.5, 3, 4)
    assert params.stop == ["x"] and params.seed == 7 and params.ignore_eos
    assert p.ChatCompletionRequest(messages=MESSAGES, logprobs=True).to_sampling_params().logprobs == 0
    assert p.ChatCompletionRequest(messages=MESSAGES).to_sampling_params().logprobs is None
    assert p.ChatCompletionRequest(messages=MESSAGES).to_sampling_params().max_tokens is None


@pytest.mark.parametrize("fields, param", [
    ({"n": 2, "temperature": 0.0}, "n"),
    ({"min_tokens": 9, "max_tokens": 3}, "min_tokens"),
    ({"top_logprobs": 1}, "top_logprobs"),
    ({"logit_bias": {"1": 2.0}}, "logit_bias"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"structured_outputs": {"regex": "a"}, "ignore_eos": True}, "ignore_eos"),
    ({"chat_template_kwargs": {"chat_template": "{{ 7 * 7 }}"}}, "chat_template_kwargs"),
])
def test_refusals_name_the_field(fields, param):
    with pytest.raises(p.RequestError) as info:
        p.ChatCompletionRequest(messages=MESSAGES, **fields).to_sampling_params()
    assert info.value.param == param


def test_range_checks_are_pydantic_errors_on_the_field():
    with pytest.raises(ValidationError) as info:
        p.ChatCompletionRequest(messages=MESSAGES, temperature=2.5)
    assert info.value.errors()[0]["loc"] == ("temperature",)
    with pytest.raises(ValidationError) as info:  # the schema says a stop string is not empty
        p.ChatCompletionRequest(messages=MESSAGES, stop=[""])
    assert all(e["loc"][0] == "stop" for e in info.value.errors())


def test_completion_prompts_and_defaults():
    assert p.CompletionRequest(prompt="a").prompts() == ["a"]
    assert p.CompletionRequest(prompt=[1, 2]).prompts() == [[1, 2]]
    assert p.CompletionRequest(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert p.CompletionRequest(prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    assert p.CompletionRequest(prompt="a").to_sampling_params().max_tokens == 16  # OpenAI's default
    for empty in ("", [], [[]], [""]):  # the schema says so: a 400 from validation
        with pytest.raises(ValidationError):
            p.CompletionRequest(prompt=empty)
    for not_json_type in ([True], [1.5], "a".encode()):
        with pytest.raises(ValidationError):
            p.CompletionRequest(prompt=not_json_type)
    assert p.CompletionRequest(prompt=[1.0, 2]).prompts() == [[1, 2]]  # JSON Schema's integer: 1.0 is one


def test_logprob_shapes():
    entries = [{5: Logprob(-0.5, 2, "b"), 4: Logprob(-0.1, 1, "a"), 6: Logprob(-2.0, 3, "c")},
               {7: Logprob(float("-inf"), 9, "zz"), 4: Logprob(-0.2, 1, "a")}]
    chat = p.chat_logprobs([5, 7], entries, num_top=2)
    assert [e.token for e in chat.content] == ["b", "zz"]
    assert [t.token for t in chat.content[0].top_logprobs] == ["a", "b"]
    assert chat.content[1].logprob == -9999.0 and chat.content[1].bytes == [122, 122]
    completion = p.completion_logprobs([5, 7], entries, num_top=1, text_offset=10)
    assert completion.tokens == ["b", "zz"] and completion.text_offset == [10, 11]
    assert completion.top_logprobs == [{"a": -0.1}, {"a": -0.2}]


def test_stream_cursor_holds_back_what_a_stop_string_may_claim():
    params = SamplingParams(stop=["END"])
    holdback = streaming.holdback(params)
    assert holdback == 2 and streaming.holdback(SamplingParams(stop=["END"], include_stop_str_in_output=True)) == 0
    cursor, sent = streaming.Cursor(), []
    # cumulative outputs as the engine gives them: the final text is cut before "END" once it completes
    steps = [("hello", [1], None), ("hello E", [1, 2], None), ("hello EN", [1, 2, 3], None),
             ("hello ", [1, 2, 3, 4], "stop")]
    for text, ids, finish in steps:
        output = CompletionOutput(0, text, ids, finish_reason=finish)
        step = streaming.advance(cursor, output, holdback, wants_tokens=False)
        if step is not None:
            sent.append(step[0])
    assert "".join(sent) == "hello "  # without the hold-back "hello EN" would have gone out
    assert streaming.advance(cursor, CompletionOutput(0, "hello ", [1], finish_reason="stop"), 0, False) is None


def test_response_format_and_structured_outputs_become_structured_outputs_params():
    def so(**fields):
        return p.ChatCompletionRequest.model_validate({"messages": MESSAGES, **fields}).to_sampling_params() \
            .structured_outputs

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert so() is None and so(response_format={"type": "text"}) is None
    assert so(response_format={"type": "json_object"}).json_object is True
    assert so(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}).json == schema
    assert so(response_format={"type": "json_schema", "json_schema": {"name": "x"}}).json == {}
    assert so(structured_outputs={"json": schema}).json == schema
    assert so(structured_outputs={"choice": ["a", "b"]}).choice == ["a", "b"]
    assert so(structured_outputs={"regex": "[0-9]+"}).regex == "[0-9]+"
    assert so(structured_outputs={"grammar": 'start: "x"'}).grammar == 'start: "x"'
    completion = p.CompletionRequest.model_validate({"prompt": "x", "structured_outputs": {"json_object": True}})
    assert completion.to_sampling_params().structured_outputs.json_object is True

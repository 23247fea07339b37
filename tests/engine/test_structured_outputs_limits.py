"""What one structured-outputs constraint may cost (a server client is untrusted): over a limit at compile time is
a ValueError naming the limit, quickly; a grammar that reaches a per-step limit while generating finishes its
request with reason "error" naming the limit, and the requests beside it finish normally."""
from __future__ import annotations

import json
import time

import pytest

from fovea import LLM, SamplingParams, StructuredOutputsParams
from fovea.config import STRUCTURED_OUTPUTS_LIMITS, EngineConfig
from tests.oracle.qwen2_5_vl import build_tiny_qwen2

OPTIONS = dict(dtype="float32", block_size=4, num_kv_blocks=256, max_model_len=512, num_threads=1)
# every string of a's and b's is parsed in exponentially many ways: the Earley items per step grow with the output
AMBIGUOUS = 'start: x\nx: x x | "a" | "b"'


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(build_tiny_qwen2(tmp_path_factory.mktemp("structured_limits_qwen2"), seed=0))


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, **OPTIONS)


def huge_enum(num_values: int) -> dict:
    return {"enum": [f"value number {i}" for i in range(num_values)]}


def refused(llm, so: StructuredOutputsParams) -> tuple[str, float]:
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as err:
        llm.generate(["x"], SamplingParams(max_tokens=4, structured_outputs=so), use_tqdm=False)
    return str(err.value), time.perf_counter() - t0


def chain(num_rules: int) -> str:
    """A Lark grammar whose rules nest num_rules deep (r0 -> r1 -> ...), ~19 bytes a rule."""
    return "start: r0\n" + "\n".join(f'r{i}:"a" r{i + 1}|"c"' for i in range(num_rules)) + f'\nr{num_rules}:"z"'


def test_a_huge_enum_is_refused_by_size_before_llguidance_sees_it(llm):
    message, seconds = refused(llm, StructuredOutputsParams(json=huge_enum(100_000)))
    assert "structured_outputs.json is too large" in message and "max_bytes=65536" in message, message
    assert "--structured-outputs-limits" in message
    assert seconds < 2.0, seconds


def test_a_grammar_over_llguidance_limits_is_refused_naming_the_limit(ckpt):
    small = LLM(ckpt, **OPTIONS, structured_outputs_limits={"max_grammar_size": 1_000})
    message, seconds = refused(small, StructuredOutputsParams(grammar=chain(300)))
    assert "exceeds the limit max_grammar_size=1000" in message, message
    assert seconds < 5.0, seconds
    # the lexer's compile budget: 2,000 enum values (40 kB) fit in max_bytes, not in 10,000 fuel
    fuel = LLM(ckpt, **OPTIONS, structured_outputs_limits={"initial_lexer_fuel": 10_000})
    message, seconds = refused(fuel, StructuredOutputsParams(json=huge_enum(2_000)))
    assert "exceeds the limit initial_lexer_fuel=10000" in message, message
    assert seconds < 5.0, seconds


def test_a_deeply_nested_lark_grammar_compiles_instead_of_killing_the_process(llm):
    """3,000 nested rules (58 kB, under max_bytes) overflow a default 8 MB thread stack inside llguidance 1.9
    (SIGSEGV: the whole server gone); fovea compiles on a thread with a deep stack, so this request runs."""
    grammar = chain(3_000)
    assert len(grammar) <= STRUCTURED_OUTPUTS_LIMITS["max_bytes"]
    out = llm.generate(["x"], SamplingParams(temperature=0.0, max_tokens=8, structured_outputs=StructuredOutputsParams(
        grammar=grammar)), use_tqdm=False)[0].outputs[0]
    assert out.text and set(out.text) <= {"a", "c", "z"} and out.finish_reason in ("stop", "length"), out


def test_a_deeply_nested_schema_is_refused(llm):
    schema = {"type": "integer"}
    for _ in range(300):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    message, seconds = refused(llm, StructuredOutputsParams(json=json.dumps(schema)))
    assert "structured_outputs.json is invalid" in message and "recursion" in message, message
    assert seconds < 2.0


def test_a_step_limit_reached_while_generating_ends_that_request_alone(ckpt):
    limited = LLM(ckpt, **OPTIONS, structured_outputs_limits={"step_max_items": 400})
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    choice = SamplingParams(temperature=0.0, max_tokens=12, structured_outputs=StructuredOutputsParams(
        choice=["yes", "no"]))
    ambiguous = SamplingParams(temperature=1.0, seed=3, max_tokens=200, structured_outputs=StructuredOutputsParams(
        grammar=AMBIGUOUS))
    outputs = limited.generate(["one", "two", "three"], [free, ambiguous, choice], use_tqdm=False)
    failed = outputs[1].outputs[0]
    assert failed.finish_reason == "error", (failed.finish_reason, failed.text)
    assert "exceeds the limit step_max_items=400" in failed.stop_reason, failed.stop_reason
    assert 0 < len(failed.token_ids) < 200 and set(failed.text) <= {"a", "b"}, failed.text
    assert len(outputs[0].outputs[0].token_ids) == 12 and outputs[0].outputs[0].finish_reason == "length"
    assert outputs[2].outputs[0].text in ("yes", "no") and outputs[2].outputs[0].finish_reason == "stop"
    # with the default limits the same grammar runs on
    roomy = LLM(ckpt, **OPTIONS).generate(["two"], ambiguous, use_tqdm=False)[0].outputs[0]
    assert roomy.finish_reason != "error", roomy.stop_reason


def test_limits_are_validated_options(ckpt):
    with pytest.raises(ValueError, match="unknown limit 'max_states'.*max_lexer_states"):
        EngineConfig(ckpt, structured_outputs_limits={"max_states": 5})
    with pytest.raises(ValueError, match=r"structured_outputs_limits\['max_bytes'\]=0 must be a positive integer"):
        EngineConfig(ckpt, structured_outputs_limits={"max_bytes": 0})
    config = EngineConfig(ckpt, structured_outputs_limits={"max_bytes": 10})
    assert config.structured_outputs_limits == {**STRUCTURED_OUTPUTS_LIMITS, "max_bytes": 10}

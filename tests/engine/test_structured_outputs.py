"""Structured outputs on a tiny random Qwen2 (random weights: the grammar does all the work). Every constrained
output parses and validates (jsonschema), choices are one of the choices, regex outputs match; constrained and
unconstrained rows share batches; a bad schema / regex / grammar is a ValueError; preemption keeps the grammar
where the output is."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from fovea import LLM, SamplingParams, StructuredOutputsParams
from fovea.worker.sampler import Sampler, SamplingMetadata, SamplingRow
from tests.oracle.qwen2_5_vl import build_tiny_qwen2

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                                               "maxItems": 3}},
     "required": ["colour", "ok", "tags"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 99}, "y": {"type": "null"}},
        "required": ["x", "y"], "additionalProperties": False}}, "required": ["point"], "additionalProperties": False},
]
CHOICES = ["yes", "no", "maybe so", 'a "quoted" one']
REGEXES = [r"[0-9]{3}-[a-z]{2,4}", r"(cat|dog)s? (and|or) (bird|fish)", r"-?[1-9][0-9]{0,3}\.[0-9]{2}"]
OPTIONS = dict(dtype="float32", block_size=4, num_kv_blocks=256, max_model_len=512, num_threads=1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(build_tiny_qwen2(tmp_path_factory.mktemp("structured_qwen2"), seed=0))


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, **OPTIONS)


def fifty_requests() -> list[tuple[str, SamplingParams]]:
    """50 constrained requests, greedy and random (seeded) alike, each paired with its kind and target."""
    requests = []
    for i in range(50):
        kind = ("json", "choice", "regex", "json_object")[i % 4]
        if kind == "json":
            target = SCHEMAS[(i // 4) % len(SCHEMAS)]
            so = StructuredOutputsParams(json=target if i % 8 else json.dumps(target))
        elif kind == "choice":
            target, so = CHOICES, StructuredOutputsParams(choice=CHOICES)
        elif kind == "regex":
            target = REGEXES[(i // 4) % len(REGEXES)]
            so = StructuredOutputsParams(regex=target)
        else:
            target, so = None, StructuredOutputsParams(json_object=True)
        params = SamplingParams(temperature=0.0 if i % 3 == 0 else 1.0, seed=None if i % 3 == 0 else i,
                                max_tokens=400, structured_outputs=so)
        requests.append((kind, target, params))
    return requests


def check(kind: str, target, text: str) -> None:
    if kind == "json":
        jsonschema.validate(json.loads(text), target)
    elif kind == "json_object":
        assert isinstance(json.loads(text), dict), text
    elif kind == "choice":
        assert text in target, text
    else:
        assert re.fullmatch(target, text), (target, text)


def test_fifty_constrained_requests_all_valid_with_unconstrained_rows_in_the_same_batches(llm):
    requests = fifty_requests()
    free = SamplingParams(temperature=1.0, seed=7, max_tokens=30, ignore_eos=True, logprobs=2)
    prompts = [f"request {i}: give me the answer" for i in range(len(requests))] + ["free text", "more free text"]
    outputs = llm.generate(prompts, [p for _, _, p in requests] + [free, free], use_tqdm=False)
    for (kind, target, _), out in zip(requests, outputs):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (kind, completion.text)
        check(kind, target, completion.text)
    # the unconstrained rows are exactly what they are alone: the grammar rows did not touch them
    alone = llm.generate(["free text", "more free text"], free, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs[-2:]] == [o.outputs[0].token_ids for o in alone]
    # their logprobs too, up to the model's own float32 noise: a batch of other size sums its GEMMs in another
    # order (the sampler's part is bit-exact: test_unconstrained_rows_are_bit_identical_...)
    for mixed_out, alone_out in zip(outputs[-2:], alone):
        for a, b in zip(mixed_out.outputs[0].logprobs, alone_out.outputs[0].logprobs, strict=True):
            assert a.keys() == b.keys()
            assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)
    assert all(len(o.outputs[0].token_ids) == 30 for o in alone)


def test_constraint_changes_what_the_model_would_write(llm):
    """Not vacuous: unconstrained, the random model writes no valid JSON for the same prompt."""
    prompt = "request 0: give me the answer"
    free = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=40), use_tqdm=False)[0].outputs[0]
    with pytest.raises(ValueError):
        json.loads(free.text)


def test_bad_constraints_are_value_errors_naming_the_problem(llm):
    cases = [
        (StructuredOutputsParams(json={"type": "nonsense"}), "structured_outputs.json is invalid.*nonsense"),
        (StructuredOutputsParams(json='{"type": '), "structured_outputs.json is invalid"),
        (StructuredOutputsParams(regex="a(b"), "structured_outputs.regex is invalid.*unclosed group"),
        (StructuredOutputsParams(grammar="start: undefined_rule"), "structured_outputs.grammar is invalid.*unknown"),
    ]
    for so, message in cases:
        with pytest.raises(ValueError, match="(?s)" + message):
            llm.generate(["x"], SamplingParams(structured_outputs=so), use_tqdm=False)
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="exactly one of.*none"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="choice must be a non-empty list"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="ignore_eos must be false"):
        SamplingParams(ignore_eos=True, structured_outputs=StructuredOutputsParams(regex="a"))
    with pytest.raises(ValueError, match="min_tokens must be 0 with structured_outputs"):
        SamplingParams(min_tokens=2, structured_outputs=StructuredOutputsParams(regex="a"))
    # the engine is untouched and still serves
    assert llm.generate(["x"], SamplingParams(max_tokens=50, structured_outputs=StructuredOutputsParams(
        choice=["ok"])), use_tqdm=False)[0].outputs[0].text == "ok"


def test_lark_grammar(llm):
    grammar = 'start: "(" expr ")"\nexpr: NUM | NUM "+" NUM\nNUM: /[0-9]{1,3}/'
    outs = llm.generate([f"p{i}" for i in range(6)], [SamplingParams(
        temperature=1.0, seed=i, max_tokens=50, structured_outputs=StructuredOutputsParams(grammar=grammar))
        for i in range(6)], use_tqdm=False)
    for out in outs:
        assert re.fullmatch(r"\([0-9]{1,3}(\+[0-9]{1,3})?\)", out.outputs[0].text), out.outputs[0].text


def test_preemption_keeps_the_grammar_state(ckpt, llm):
    """With a KV cache too small for the batch, sequences are preempted and recomputed mid-output; their
    (greedy) outputs equal the roomy run's and still validate."""
    schema = SCHEMAS[1]
    params = [SamplingParams(temperature=0.0, max_tokens=120, structured_outputs=StructuredOutputsParams(
        json=schema)) for _ in range(6)]
    prompts = [f"preempt me {i}" for i in range(6)]
    roomy = llm.generate(prompts, params, use_tqdm=False)
    tight_llm = LLM(ckpt, **{**OPTIONS, "num_kv_blocks": 40, "max_model_len": 160})
    tight = tight_llm.generate(prompts, params, use_tqdm=False)
    assert tight_llm.llm_engine.engine_core.scheduler.num_preemptions > 0
    for a, b in zip(roomy, tight):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        jsonschema.validate(json.loads(b.outputs[0].text), schema)


def test_sampler_masks_only_constrained_rows_and_leaves_logits_alone():
    from fovea.engine.structured_output import GrammarCompiler
    from tests.oracle.qwen2_5_vl import build_qwen_tokenizer
    tokenizer = build_qwen_tokenizer()
    vocab = (len(tokenizer) + 15) // 16 * 16
    compiler = GrammarCompiler(tokenizer, vocab)
    matcher = compiler.matcher(StructuredOutputsParams(choice=["7"]))
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    rows = [SamplingRow(SamplingParams(temperature=0.0), [1], []) for _ in range(3)]
    rows[1].grammar = matcher
    out = Sampler()(logits, SamplingMetadata.build(rows, vocab))
    assert torch.equal(logits, before)
    seven = tokenizer.convert_tokens_to_ids("7")
    assert out.sampled_token_ids.tolist() == [int(before[0].argmax()), seven, int(before[2].argmax())]


def _rows(specs, compiler):
    """SamplingRows from (params, constraint or None); seeded rows get fresh generators, so two calls agree."""
    from fovea.worker.sampler import seeded_generator
    rows = []
    for params, so in specs:
        generator = seeded_generator(params.seed) if params.seed is not None else None
        rows.append(SamplingRow(params, [5, 6, 7], [8, 9], generator=generator,
                                grammar=compiler.matcher(so) if so is not None else None))
    return rows


def test_unconstrained_rows_are_bit_identical_to_the_same_rows_without_the_constrained_ones():
    """Greedy, seeded random, penalties and logprobs on bfloat16 logits: the unconstrained rows of a mixed batch
    give exactly (bit for bit) the ids and logprobs that the same rows give in a batch of their own; the
    constrained rows obey their grammar, with -inf logprobs on what it forbids, and a seeded one draws as it
    would alone."""
    from fovea.engine.structured_output import GrammarCompiler
    from tests.oracle.qwen2_5_vl import build_qwen_tokenizer
    tokenizer = build_qwen_tokenizer()
    vocab = (len(tokenizer) + 15) // 16 * 16
    compiler = GrammarCompiler(tokenizer, vocab)
    free = [(SamplingParams(temperature=0.0, logprobs=2), None),
            (SamplingParams(temperature=0.8, top_k=20, seed=3, logprobs=3), None),
            (SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5), None),
            (SamplingParams(temperature=1.0, top_p=0.9, seed=4), None)]
    seven = StructuredOutputsParams(choice=["7"])
    constrained = [(SamplingParams(temperature=0.9, seed=5, logprobs=5), seven),
                   (SamplingParams(temperature=0.0), StructuredOutputsParams(regex="[0-9]+"))]
    order = [free[0], constrained[0], free[1], free[2], constrained[1], free[3]]
    free_at, constrained_at = [0, 2, 3, 5], [1, 4]
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    before = logits.clone()

    mixed = Sampler()(logits, SamplingMetadata.build(_rows(order, compiler), vocab))
    alone = Sampler()(logits[free_at], SamplingMetadata.build(_rows(free, compiler), vocab))
    assert torch.equal(logits, before)
    assert mixed.sampled_token_ids[free_at].tolist() == alone.sampled_token_ids.tolist()
    k = alone.logprobs.token_ids.shape[1]
    assert torch.equal(mixed.logprobs.token_ids[free_at, :k], alone.logprobs.token_ids)
    assert torch.equal(mixed.logprobs.logprobs[free_at, :k], alone.logprobs.logprobs)  # bit for bit
    assert torch.equal(mixed.logprobs.sampled_token_ranks[free_at], alone.logprobs.sampled_token_ranks)
    mixed_dicts, alone_dicts = mixed.logprobs.to_dicts(), alone.logprobs.to_dicts()
    assert [mixed_dicts[i] for i in free_at] == alone_dicts

    ids = mixed.sampled_token_ids.tolist()
    assert ids[1] == tokenizer.convert_tokens_to_ids("7")
    assert tokenizer.decode([ids[4]]).isdigit()
    row = mixed_dicts[1]  # 5 top logprobs + the sampled token's: only "7" is allowed, so it holds all the mass
    assert row[ids[1]].logprob == 0.0 and row[ids[1]].rank == 1
    assert sum(1 for lp in row.values() if lp.logprob == float("-inf")) == len(row) - 1
    assert mixed_dicts[4] is None
    # the seeded constrained row alone draws the same
    seeded_alone = Sampler()(logits[[1]], SamplingMetadata.build(_rows([constrained[0]], compiler), vocab))
    assert seeded_alone.sampled_token_ids.tolist() == [ids[1]]


def test_a_greedy_batch_keeps_its_fast_path_beside_random_constrained_rows():
    """The batch's own pass is planned from the unconstrained rows alone: greedy rows without logprobs stay on
    the all-greedy argmax path whatever the constrained rows ask for."""
    from fovea.engine.structured_output import GrammarCompiler
    from tests.oracle.qwen2_5_vl import build_qwen_tokenizer
    tokenizer = build_qwen_tokenizer()
    vocab = (len(tokenizer) + 15) // 16 * 16
    compiler = GrammarCompiler(tokenizer, vocab)
    specs = [(SamplingParams(temperature=0.0), None)] * 3 + [
        (SamplingParams(temperature=0.7, seed=1, logprobs=4, presence_penalty=0.5),
         StructuredOutputsParams(regex="[a-z]+"))]
    meta = SamplingMetadata.build(_rows(specs, compiler), vocab)
    assert meta.all_greedy and meta.max_num_logprobs is None and meta.no_penalties and not meta.generators
    assert meta.grammar.rows.tolist() == [3] and not meta.grammar.meta.all_greedy
    assert meta.grammar.meta.max_num_logprobs == 4 and not meta.grammar.meta.no_penalties
    all_constrained = SamplingMetadata.build(_rows(specs[3:] * 2, compiler), vocab)
    assert all_constrained.grammar.is_whole_batch

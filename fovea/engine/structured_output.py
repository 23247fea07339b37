"""Structured outputs: a request's `StructuredOutputsParams` -> an llguidance grammar, and per-sequence matchers.

llguidance (Rust, CPU wheels on PyPI, no other dependency) was chosen over xgrammar by measurement and weight:
see the README's "Structured outputs". The engine compiles and checks each request's grammar when it is added
(so a bad schema is a ValueError before anything is queued), and the model runner keeps one matcher per
sequence: the sampler masks the tokens the matcher forbids, and the runner advances the matcher with the token
it accepted. A preempted sequence keeps its runner state (recompute preemption keeps its output tokens), so its
matcher stays where its output is.

Choices where the request is silent (as vLLM's defaults): JSON is written without optional whitespace (with
random or weak weights, flexible whitespace lets a model spend its whole budget on blanks); once the grammar is
complete only EOS is allowed, so the output ends there.
"""
from __future__ import annotations

import json
from typing import Any

import torch

from fovea.sampling_params import StructuredOutputsParams

_JSON_DEFAULTS = {"whitespace_flexible": False}


class GrammarCompiler:
    """Compiles grammars for one tokenizer, each distinct one once; makes fresh matchers from them."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        import llguidance
        import llguidance.hf

        self._llguidance = llguidance
        # n_vocab: the model's logits may be wider than the tokenizer (padded); the extra ids are never allowed
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.vocab_size = vocab_size
        self._grammars: dict[str, str] = {}

    def compile(self, params: StructuredOutputsParams) -> str:
        """The llguidance grammar of `params`, checked against the tokenizer; ValueError naming the problem."""
        key = _cache_key(params)
        grammar = self._grammars.get(key)
        if grammar is None:
            grammar = self._build(params)
            error = self._llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
            if error:
                raise ValueError(f"structured_outputs.{_kind(params)} is invalid: {error.strip()}")
            if len(self._grammars) >= 1024:  # a client can send endless distinct schemas: keep the cache bounded
                self._grammars.clear()
            self._grammars[key] = grammar
        return grammar

    def matcher(self, params: StructuredOutputsParams):
        return self._llguidance.LLMatcher(self.tokenizer, self.compile(params))

    def _build(self, params: StructuredOutputsParams) -> str:
        matcher = self._llguidance.LLMatcher
        try:
            if params.json is not None:
                schema = params.json
                if isinstance(schema, str):
                    schema = json.loads(schema)  # its error names line and column
                if not isinstance(schema, (dict, bool)):
                    raise ValueError(f"a JSON Schema is an object or a boolean, got {type(schema).__name__}")
                schema = json.dumps(schema)
                return matcher.grammar_from_json_schema(schema, defaults=_JSON_DEFAULTS)
            if params.json_object:
                return matcher.grammar_from_json_schema('{"type": "object"}', defaults=_JSON_DEFAULTS)
            if params.regex is not None:
                return matcher.grammar_from_regex(params.regex)
            if params.choice is not None:
                # JSON string literals are Lark string literals, so any choice text is quoted exactly
                return matcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in params.choice))
            return matcher.grammar_from_lark(params.grammar)
        except Exception as err:  # llguidance raises ValueError or its own types for input it cannot parse
            raise ValueError(f"structured_outputs.{_kind(params)} is invalid: {err}") from err


def _kind(params: StructuredOutputsParams) -> str:
    for name in ("json", "regex", "choice", "grammar"):
        if getattr(params, name) is not None:
            return name
    return "json_object"


def _cache_key(params: StructuredOutputsParams) -> str:
    value = getattr(params, _kind(params)) if _kind(params) != "json_object" else True
    return json.dumps([_kind(params), value], sort_keys=True)


_EXECUTOR = None


def mask_rows(logits: torch.Tensor, matchers: list) -> None:
    """Set the tokens each matcher forbids next to -inf in its row of `logits` ((R, V) float32, in place). All
    masks come from one llguidance call (it spreads the rows over threads) as a bitmask, bit j of word w = token
    32 w + j, applied by llguidance's kernel: expanding the bits into a boolean (R, V) mask in torch costs ten
    times as much on CPU."""
    global _EXECUTOR
    import llguidance
    import llguidance.torch

    if _EXECUTOR is None:
        _EXECUTOR = llguidance.LLExecutor()
    bitmask = llguidance.torch.allocate_token_bitmask(len(matchers), logits.shape[1])  # (R, ceil(V / 32)) int32
    llguidance.torch.fill_next_token_bitmask_par(_EXECUTOR, [(m, i) for i, m in enumerate(matchers)], bitmask)
    llguidance.torch.apply_token_bitmask_inplace(logits, bitmask)

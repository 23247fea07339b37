"""Structured outputs: a request's `StructuredOutputsParams` -> an llguidance grammar, and per-sequence matchers.

llguidance (Rust, CPU wheels on PyPI, no other dependency) was chosen over xgrammar by measurement and weight:
see the README's "Structured outputs". The engine compiles and checks each request's grammar when it is added
(so a bad schema is a ValueError before anything is queued), and the model runner keeps one matcher per
sequence: the sampler masks the tokens the matcher forbids, and the runner advances the matcher with the token
it accepted. A preempted sequence keeps its runner state (recompute preemption keeps its output tokens), so its
matcher stays where its output is.

A constraint comes from an untrusted client, so what it may cost is bounded (`EngineConfig.
structured_outputs_limits`, defaults in `fovea.config.STRUCTURED_OUTPUTS_LIMITS`): its text's size, then
llguidance's parser limits, which count compile and per-step work as fuel and bound the lexer's states (its
memory). Over a limit at compile time is a ValueError naming the limit (a 400 from the server); a matcher that
reaches a per-step limit while generating is in error, and its request finishes with reason "error" naming it
(the runner checks; the other sequences go on).

Choices where the request is silent (as vLLM's defaults): JSON is written without optional whitespace (with
random or weak weights, flexible whitespace lets a model spend its whole budget on blanks); once the grammar is
complete only EOS is allowed, so the output ends there.
"""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from fovea.config import STRUCTURED_OUTPUTS_LIMITS
from fovea.sampling_params import StructuredOutputsParams

_JSON_DEFAULTS = {"whitespace_flexible": False}


class GrammarCompiler:
    """Compiles grammars for one tokenizer, each distinct one once; makes fresh matchers from them."""

    def __init__(self, tokenizer: Any, vocab_size: int, limits: dict[str, int] | None = None):
        import llguidance
        import llguidance.hf

        self._llguidance = llguidance
        # n_vocab: the model's logits may be wider than the tokenizer (padded); the extra ids are never allowed
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.vocab_size = vocab_size
        self.limits = {**STRUCTURED_OUTPUTS_LIMITS, **(limits or {})}
        # verbose errors would put the parser's state (pages of it) into a client's error message
        self._parser_limits = llguidance.LLParserLimits(
            **{name: value for name, value in self.limits.items() if name in _PARSER_LIMITS}, verbose_errors=False)
        # key -> a matcher in its start state, compiled once; each sequence gets a deep copy (~0.1 ms, where
        # compiling again costs up to the limits' worth)
        self._compiled: dict[str, Any] = {}

    def compile(self, params: StructuredOutputsParams):
        """The matcher of `params` in its start state, checked against the tokenizer and the limits; ValueError
        naming the problem (or the limit). Thread-safe; a slow compile does not hold the GIL."""
        key = _cache_key(params)
        compiled = self._compiled.get(key)
        if compiled is None:
            value = getattr(params, _kind(params)) if _kind(params) != "json_object" else ""
            num_bytes = len((value if isinstance(value, str) else json.dumps(value)).encode())
            if num_bytes > self.limits["max_bytes"]:
                raise ValueError(f"structured_outputs.{_kind(params)} is too large: {num_bytes} bytes, over the "
                                 f"limit max_bytes={self.limits['max_bytes']}{_LIMITS_HINT}")
            grammar = self._build(params)
            compiled = _on_deep_stack(self._llguidance.LLMatcher, self.tokenizer, grammar,
                                      limits=self._parser_limits)
            if compiled.is_error():
                raise ValueError(self.describe_error(f"structured_outputs.{_kind(params)}", compiled.get_error()))
            if len(self._compiled) >= 256:  # a client can send endless distinct schemas: keep the cache bounded
                self._compiled.clear()
            self._compiled[key] = compiled
        return compiled

    def matcher(self, params: StructuredOutputsParams):
        return self.compile(params).deep_copy()

    def describe_error(self, what: str, error: str) -> str:
        """llguidance's error text, with the limit it reached named as fovea's option names it."""
        error = error.strip()[:2000] or "unknown error"  # the whole diagnosis (a regex's spans several lines)
        for phrase, name in _LIMIT_PHRASES:
            if phrase in error.lower():
                return f"{what} exceeds the limit {name}={self.limits[name]} ({error}){_LIMITS_HINT}"
        return f"{what} is invalid: {error}"

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


_PARSER_LIMITS = ("max_grammar_size", "initial_lexer_fuel", "step_lexer_fuel", "step_max_items", "max_lexer_states",
                  "max_items_in_row")
# how llguidance's messages (1.9) say which limit was reached
_LIMIT_PHRASES = (("grammar size", "max_grammar_size"), ("initial lexer", "initial_lexer_fuel"),
                  ("too many items", "step_max_items"), ("lexer states", "max_lexer_states"),
                  ("max_lexer_states", "max_lexer_states"), ("fuel", "step_lexer_fuel"),
                  ("items in row", "max_items_in_row"), ("max_items_in_row", "max_items_in_row"))
# how the runner's message for a request whose grammar failed while generating begins (the server tells it from
# a model error by this: a 400, not a 500)
CONSTRAINT_ERROR_PREFIX = "structured_outputs"
_LIMITS_HINT = "; the server's operator sets these limits (EngineConfig.structured_outputs_limits, " \
               "fovea serve --structured-outputs-limits)"


# llguidance 1.9 recurses once per nested rule when it compiles a Lark grammar, without a depth limit: a chain of
# ~3,000 rules (70 kB) overflows a default 8 MB thread stack and kills the process (SIGSEGV). So every compile runs
# on a thread whose stack holds the deepest grammar `max_bytes` allows (~2.7 kB of stack per rule, >= 10 bytes of
# text per rule: 64 kB of text needs < 20 MB); the memory is reserved, only what a compile touches is used.
_STACK_BYTES = 256 << 20
_COMPILER_THREADS = None


def _on_deep_stack(fn, *args, **kwargs):
    global _COMPILER_THREADS
    if _COMPILER_THREADS is None:
        with _STACK_LOCK:
            if _COMPILER_THREADS is None:
                previous = threading.stack_size(_STACK_BYTES)
                try:
                    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fovea-grammar")
                    # threads start on demand: start both now, while the stack size holds
                    barrier = threading.Barrier(3)
                    for _ in range(2):
                        pool.submit(barrier.wait)
                    barrier.wait()
                finally:
                    threading.stack_size(previous)
                _COMPILER_THREADS = pool
    return _COMPILER_THREADS.submit(fn, *args, **kwargs).result()


_STACK_LOCK = threading.Lock()


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

"""SamplingParams: how to pick the next tokens of one request and when to stop.

Field names, defaults and meaning follow vLLM's offline API, so code written against `vllm.SamplingParams`
runs unchanged. Every value is checked on construction; an invalid one raises `ValueError` naming the field,
the value and what is allowed. An unknown keyword is a `TypeError` (this is a plain dataclass).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

# Below this temperature a request is greedy (vLLM's _SAMPLING_EPS): dividing logits by it would only
# amplify float noise, and argmax is what such a temperature means anyway.
SAMPLING_EPS = 1e-5
# The sampler applies penalties in float32: a factor outside its normal range would become 0 or inf there, and
# 0 * inf is NaN (a logit of exactly 0 times an infinite penalty).
_FLOAT32_MIN_NORMAL, _FLOAT32_MAX = 1.1754943508222875e-38, 3.4028234663852886e38


@dataclass
class StructuredOutputsParams:
    """Constrain the output to a language (vLLM's `StructuredOutputsParams`): set exactly one of these.

    The grammar engine (llguidance, `fovea.engine.structured_output`) compiles it against the tokenizer when the
    request is added; a schema, regex or grammar it cannot compile is a ValueError naming the problem.
    """

    json: str | dict | None = None
    """A JSON Schema (a dict, or its JSON text); the output is one JSON value that validates against it."""
    regex: str | None = None
    """The whole output matches this regular expression (Rust `regex` syntax, anchored at both ends)."""
    choice: list[str] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """A context-free grammar in llguidance's Lark dialect (`start: ...`)."""
    json_object: bool | None = None
    """Any JSON object (OpenAI's `response_format={"type": "json_object"}`)."""

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            raise ValueError(f"structured_outputs must set exactly one of json, regex, choice, grammar, json_object; "
                             f"got {', '.join(given) if given else 'none'}.")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError(f"structured_outputs.json must be a JSON Schema (a dict or its JSON text), "
                             f"got {type(self.json).__name__}.")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r}.")
        if self.choice is not None:
            self.choice = list(self.choice) if isinstance(self.choice, (list, tuple)) else self.choice
            if (not isinstance(self.choice, list) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError(f"structured_outputs.choice must be a non-empty list of non-empty strings, "
                                 f"got {self.choice!r}.")


@dataclass
class SamplingParams:
    n: int = 1
    """Number of completions to return for the prompt."""
    temperature: float = 1.0
    """Divides the logits before softmax; 0 (anything below 1e-5) means greedy."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability sums to at least top_p; in (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens (ties with the k-th are kept); 0 or -1 means all."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely one's; in [0, 1]."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever else is in the batch. -1 = None (the
    request then draws from the engine's generator, which `EngineConfig.seed` seeds)."""
    max_tokens: int | None = 16
    """Most tokens to generate; None means up to the model's context length (the engine resolves it)."""
    min_tokens: int = 0
    """EOS and stop_token_ids are masked until this many tokens exist; stop strings are not checked earlier."""
    stop: str | list[str] | None = None
    """Strings that end the generation; kept out of the text unless include_stop_str_in_output. Stored as a list."""
    stop_token_ids: list[int] | None = None
    """Token ids that end the generation (besides EOS). Stored as a list without duplicates."""
    ignore_eos: bool = False
    """Keep generating after EOS."""
    logprobs: int | None = None
    """Return this many top log-probabilities per generated token, plus the sampled token's own."""
    prompt_logprobs: int | None = None
    """Return this many top log-probabilities per prompt token, plus the prompt token's own (vLLM's
    `prompt_logprobs`; True = 0, the token's own only). The first token and multimodal placeholders get None.
    Such a request skips the prefix cache, so every prompt position is computed (as vLLM does)."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens seen in the prompt or the output (divides positive logits, multiplies negative)."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already in the output; in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted per occurrence in the output; in [-2, 2]."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the decoded text."""
    spaces_between_special_tokens: bool = True
    """Kept for vLLM compatibility; fast (Rust) tokenizers, the only kind transformers 5 ships, ignore it."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string (or the stop token's text) at the end of the output."""
    structured_outputs: StructuredOutputsParams | None = None
    """Constrain the output to a JSON Schema, regex, choice or grammar; the grammar ends it with EOS."""

    def __post_init__(self) -> None:
        if self.seed == -1:
            self.seed = None
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.logprobs, bool):  # as vLLM: True asks for the top 1, False for none
            self.logprobs = 1 if self.logprobs else None
        if isinstance(self.prompt_logprobs, bool):
            self.prompt_logprobs = 0 if self.prompt_logprobs else None
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(dict.fromkeys(self.stop_token_ids))
        self._validate()
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            setattr(self, name, float(getattr(self, name)))
        if self.temperature < SAMPLING_EPS:
            # Greedy ignores the filters; resetting them keeps the sampler's fast paths honest.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    def _validate(self) -> None:
        _check_int("n", self.n, minimum=1)
        _check_real("temperature", self.temperature, "a finite number >= 0 (0 means greedy)",
                    lambda v: v >= 0.0)
        _check_real("top_p", self.top_p, "in (0, 1]", lambda v: 0.0 < v <= 1.0)
        _check_int("top_k", self.top_k, minimum=0, allowed="0 or -1 (disabled) or an integer >= 1")
        _check_real("min_p", self.min_p, "in [0, 1]", lambda v: 0.0 <= v <= 1.0)
        if self.seed is not None:
            # a 64-bit signed integer, as vLLM takes it: torch's generators take no more (n > 1 adds the child's
            # index, which stays within manual_seed's range up to 2**64 - 1)
            _check_int("seed", self.seed, allowed=f"an integer in [{MIN_SEED}, {MAX_SEED}], or None / -1 for no seed")
            if not MIN_SEED <= self.seed <= MAX_SEED:
                raise ValueError(f"seed must be an integer in [{MIN_SEED}, {MAX_SEED}], or None / -1 for no seed, "
                                 f"got {self.seed!r}.")
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, minimum=1, allowed="an integer >= 1 or None")
        _check_int("min_tokens", self.min_tokens, minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens={self.max_tokens}, got {self.min_tokens}.")
        for name in ("presence_penalty", "frequency_penalty"):
            _check_real(name, getattr(self, name), "in [-2, 2]", lambda v: -2.0 <= v <= 2.0)
        _check_real("repetition_penalty", self.repetition_penalty, "a number > 0 (1 = off) within float32's range "
                    "[1.2e-38, 3.4e38]", lambda v: _FLOAT32_MIN_NORMAL <= v <= _FLOAT32_MAX)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, minimum=0, allowed="None or an integer >= 0")
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, minimum=0, allowed="None or an integer >= 0")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must hold non-empty strings, got {self.stop!r}.")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids must hold integers >= 0, got {self.stop_token_ids!r}.")
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise ValueError(f"structured_outputs must be a StructuredOutputsParams, "
                                 f"got {type(self.structured_outputs).__name__}.")
            if self.ignore_eos:
                raise ValueError("ignore_eos must be false with structured_outputs: the grammar ends the output "
                                 "with EOS, and nothing may follow it.")
            if self.min_tokens:
                # a complete output allows only EOS, which min_tokens would forbid: no token would be left
                raise ValueError(f"min_tokens must be 0 with structured_outputs (the grammar decides where the "
                                 f"output ends), got {self.min_tokens}.")
        if self.n > 1 and self.temperature < SAMPLING_EPS:
            raise ValueError(f"n must be 1 when sampling greedily (temperature={self.temperature}), "
                             f"got n={self.n}: all {self.n} completions would be the same.")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def clone(self) -> SamplingParams:
        return copy.deepcopy(self)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1


def _check_int(name: str, value: object, minimum: int | None = None, allowed: str | None = None) -> None:
    allowed = allowed or f"an integer >= {minimum}"
    if not _is_int(value) or (minimum is not None and value < minimum):
        raise ValueError(f"{name} must be {allowed}, got {value!r}.")


def _check_real(name: str, value: object, allowed: str, ok) -> None:
    is_real = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_real or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}.")


@dataclass
class BeamSearchParams:
    """vLLM's `BeamSearchParams` (same names and defaults), plus transformers' `early_stopping`.

    The rules are transformers' `generate(num_beams=beam_width, do_sample=False, length_penalty=...,
    early_stopping=...)` (see fovea.engine.beam_search), which is deterministic: temperature must be 0.
    """

    beam_width: int
    """Beams kept at each step, and sequences returned."""
    max_tokens: int
    """Most tokens to generate per beam (capped by the context length)."""
    ignore_eos: bool = False
    """Do not end a beam on the model's EOS token."""
    temperature: float = 0.0
    """Only 0: beam search here ranks raw log-probabilities, as transformers' beam search without sampling."""
    length_penalty: float = 1.0
    """Finished beams are ranked by cum_logprob / num_generated_tokens ** length_penalty."""
    include_stop_str_in_output: bool = False
    """Keep the EOS token's text in `text` (it is always in `tokens`)."""
    early_stopping: bool | str = False
    """transformers' rule for ending the search: True stops once beam_width beams finished; False (its default)
    stops when the best running beam, scored at its current length, cannot beat the worst finished one;
    "never" keeps going while it could at the longest possible length."""

    def __post_init__(self) -> None:
        _check_int("beam_width", self.beam_width, minimum=1)
        _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_real("temperature", self.temperature, "0 (beam search here is deterministic, as transformers' "
                    "beam search with do_sample=False)", lambda v: v == 0)
        _check_real("length_penalty", self.length_penalty, "a finite number", lambda v: True)
        self.length_penalty = float(self.length_penalty)
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or \"never\", got {self.early_stopping!r}.")
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}.")

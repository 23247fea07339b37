"""The OpenAI API's request and response shapes, as pydantic models.

Requests ignore fields they do not know (as OpenAI does), check ranges on the fields they do (a bad value is a
400 naming the field), and turn into one `SamplingParams`. Fields OpenAI has but fovea does not serve
(`logit_bias`, `tools`, `echo`, ...) are declared so that using them is a clear 400, not silently ignored.
fovea's extras use vLLM's names: `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `min_tokens`,
`stop_token_ids`, `skip_special_tokens`, `include_stop_str_in_output`.
"""
from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import annotated_types
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from fovea.entrypoints.chat_utils import RESERVED_TEMPLATE_KWARGS
from fovea.entrypoints.openai.messages import ChatMessageParam, message_dicts
from fovea.outputs import RequestOutput
from fovea.sampling_params import MAX_SEED, MIN_SEED, BeamSearchParams, SamplingParams, StructuredOutputsParams


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class OpenAIRequestModel(OpenAIModel):
    """A request's part: JSON types as the schema states them (strict: `true` is no 1, "2" no 2.0), except that
    an integral float is an integer, as in JSON Schema."""

    model_config = ConfigDict(extra="ignore", strict=True)


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def Integer(**bounds: int) -> Any:
    """A JSON integer within `bounds` (ge, le). The bounds go before the validator so that they reach the schema
    as minimum / maximum, also inside unions (`Integer(ge=1) | None`)."""
    return Annotated[int, annotated_types.Interval(**bounds), BeforeValidator(_integral)]


Int = Integer()
# marked so that the server's schema can give the served model's vocabulary as the maximum (openapi.py)
TokenId = Annotated[Integer(ge=0), Field(json_schema_extra={"x-token-id": True})]
NonEmptyStr = Annotated[str, Field(min_length=1)]
_FLOAT32_MIN_NORMAL, _FLOAT32_MAX = 1.1754943508222875e-38, 3.4028234663852886e38  # SamplingParams' bounds


class RequestError(ValueError):
    """A request the server refuses with 400; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# ---- requests -----------------------------------------------------------------------------------------------


class StreamOptions(OpenAIRequestModel):
    include_usage: bool = False


class JsonSchemaFormat(OpenAIRequestModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # None: any JSON value
    strict: bool | None = None  # the output always follows the schema, strict or not


class ResponseFormat(OpenAIRequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(OpenAIRequestModel):
    """vLLM's `structured_outputs` request field: exactly one of these."""

    json_: dict[str, Any] | bool | str | None = Field(None, alias="json")
    regex: NonEmptyStr | None = None
    choice: Annotated[list[NonEmptyStr], Field(min_length=1)] | None = None
    grammar: NonEmptyStr | None = None
    json_object: bool | None = None


class SamplingRequest(OpenAIRequestModel):
    """Fields /v1/chat/completions and /v1/completions share. OpenAI's defaults and ranges."""

    model: str | None = None  # None: the served model
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Integer(ge=1, le=128) = 1
    max_tokens: Integer(ge=1) | None = None
    stop: NonEmptyStr | list[NonEmptyStr] | None = None
    seed: Integer(ge=MIN_SEED, le=MAX_SEED) | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, description="not supported: must be empty or null",
                                                 json_schema_extra={"maxProperties": 0})
    user: str | None = None
    # fovea's extras, vLLM's names and defaults
    top_k: Integer(ge=-1) = 0
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, ge=_FLOAT32_MIN_NORMAL, le=_FLOAT32_MAX)
    ignore_eos: bool = False
    min_tokens: Integer(ge=0) = 0
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    use_beam_search: bool = False  # n beams (transformers' rules, see the README); n choices, best first
    length_penalty: float = Field(1.0, allow_inf_nan=False)  # beam search: score = cum_logprob / length ** this
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None

    def check_unsupported(self) -> None:
        if self.logit_bias:
            raise RequestError("logit_bias is not supported by fovea", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed when stream is true", "stream_options")

    def _beam_search_params(self, max_tokens: int | None) -> BeamSearchParams:
        """vLLM's `use_beam_search`: `n` beams. What beam search cannot honour is refused, never ignored."""
        if self.stream:
            raise RequestError("stream is not supported with use_beam_search (the beams are known at the end)",
                               "stream")
        if "temperature" in self.model_fields_set and self.temperature != 0.0:
            raise RequestError("use_beam_search ranks raw log-probabilities: temperature must be 0 or left out",
                               "temperature")
        for name in _NOT_WITH_BEAMS:
            if name in self.model_fields_set and getattr(self, name) != type(self).model_fields[name].default:
                raise RequestError(f"{name} is not supported with use_beam_search", name)
        if self.response_format is not None and self.response_format.type != "text":
            raise RequestError("response_format other than text is not supported with use_beam_search",
                               "response_format")
        try:
            return BeamSearchParams(beam_width=self.n, max_tokens=max_tokens or _UNLIMITED, ignore_eos=self.ignore_eos,
                                    length_penalty=self.length_penalty,
                                    include_stop_str_in_output=self.include_stop_str_in_output)
        except ValueError as err:
            raise RequestError(str(err), "length_penalty") from err

    def _structured_outputs(self) -> StructuredOutputsParams | None:
        """`structured_outputs` (vLLM) or OpenAI's `response_format`, as StructuredOutputsParams; not both."""
        fmt = self.response_format
        if fmt is not None and fmt.type != "text" and self.structured_outputs is not None:
            raise RequestError("give response_format or structured_outputs, not both", "structured_outputs")
        try:
            if self.structured_outputs is not None:
                so = self.structured_outputs
                schema = so.json_
                if isinstance(schema, bool):  # a boolean JSON Schema: true accepts any value
                    schema = {} if schema else {"not": {}}
                return StructuredOutputsParams(json=schema, regex=so.regex, choice=so.choice, grammar=so.grammar,
                                               json_object=so.json_object)
        except ValueError as err:
            raise RequestError(str(err), "structured_outputs") from err
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if fmt.json_schema is None:
            raise RequestError("response_format type 'json_schema' needs a json_schema", "response_format")
        schema = fmt.json_schema.schema_
        return StructuredOutputsParams(json=schema if schema is not None else {})

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        fields = dict(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, logprobs=logprobs,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            structured_outputs=self._structured_outputs(),
        )
        try:
            return SamplingParams(**fields)
        except ValueError as err:  # SamplingParams' messages start with the field's name
            first_word = str(err).split(" ", 1)[0].split("=", 1)[0]
            raise RequestError(str(err), first_word if first_word in fields else None) from err

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


# fields whose non-default values beam search cannot honour (they are refused with it); _UNLIMITED: no
# max_tokens given, so the context length decides (the engine caps every search by what the prompt leaves)
_NOT_WITH_BEAMS = ("top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "min_tokens", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "logprobs", "top_logprobs", "echo", "best_of",
                   "structured_outputs")
_UNLIMITED = 2**31 - 1


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessageParam] = Field(min_length=1)
    max_completion_tokens: Integer(ge=1) | None = None
    logprobs: bool = False
    top_logprobs: Integer(ge=0, le=20) | None = None
    tools: list[dict[str, Any]] | None = Field(None, description="not supported: must be empty or null",
                                               json_schema_extra={"maxItems": 0})
    # vLLM's extras for the template
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def to_sampling_params(self) -> SamplingParams:
        self.check_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs to be true", "top_logprobs")
        if self.tools:
            raise RequestError("tools are not supported by fovea", "tools")
        reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(self.chat_template_kwargs or {}))
        if reserved:
            raise RequestError(f"chat_template_kwargs may not set {', '.join(reserved)}", "chat_template_kwargs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if self.use_beam_search:
            return self._beam_search_params(max_tokens)
        return self._sampling_params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)

    def message_dicts(self) -> list[dict[str, Any]]:
        """The messages as plain dicts, what `build_chat_prompt` takes."""
        return message_dicts(self.messages)


class CompletionRequest(SamplingRequest):
    prompt: (NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)])
    max_tokens: Integer(ge=1) | None = 16  # OpenAI's default for completions
    logprobs: Integer(ge=0, le=20) | None = None
    echo: bool = Field(False, description="the prompt before each completion (with logprobs: the prompt "
                                          "tokens' too, the first one null)")
    suffix: str | None = Field(None, description="not supported: must be empty or null",
                               json_schema_extra={"maxLength": 0})
    best_of: Int | None = Field(None, description="only null or equal to n")

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        else:
            prompts = list(prompt)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise RequestError("prompt must not be empty", "prompt")
        return prompts

    def to_sampling_params(self) -> SamplingParams:
        self.check_unsupported()
        if self.suffix:
            raise RequestError("suffix is not supported by fovea", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError("best_of other than n is not supported by fovea", "best_of")
        if self.use_beam_search:
            return self._beam_search_params(self.max_tokens)
        params = self._sampling_params(self.max_tokens, self.logprobs)
        if self.echo and self.logprobs is not None:
            params.prompt_logprobs = self.logprobs  # as vLLM: echo with logprobs scores the prompt too
        return params


# ---- responses ----------------------------------------------------------------------------------------------


class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(OpenAIModel):
    error: ErrorInfo


class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def make_usage(num_prompt_tokens: int, num_completion_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=num_prompt_tokens, completion_tokens=num_completion_tokens,
                     total_tokens=num_prompt_tokens + num_completion_tokens)


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "fovea"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's base model (vLLM's field)
    max_model_len: int | None = None


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(OpenAIModel):
    content: list[TokenLogprob] | None = None


class ChatMessage(OpenAIModel):
    role: str = "assistant"
    content: str | None = None


class ChatCompletionChoice(OpenAIModel):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(OpenAIModel):
    role: str | None = None
    content: str | None = None


class ChatCompletionStreamChoice(OpenAIModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


class CompletionLogprobs(OpenAIModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(OpenAIModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None  # always set, except on streamed chunks without include_usage


# ---- engine outputs -> responses ---------------------------------------------------------------------------


def chat_logprobs(token_ids: list[int], entries: list[dict], num_top: int) -> ChatLogprobs:
    """`entries[i]` is the engine's {token id: Logprob} for `token_ids[i]` (the sampled one plus the top ones)."""
    content = []
    for token_id, entry in zip(token_ids, entries):
        sampled = entry[token_id]
        top = sorted((lp for lp in entry.values() if lp.rank is not None and lp.rank <= num_top),
                     key=lambda lp: lp.rank)
        content.append(TokenLogprob(
            token=sampled.decoded_token, logprob=_finite(sampled.logprob),
            bytes=list(sampled.decoded_token.encode()),
            top_logprobs=[TopLogprob(token=lp.decoded_token, logprob=_finite(lp.logprob),
                                     bytes=list(lp.decoded_token.encode())) for lp in top],
        ))
    return ChatLogprobs(content=content)


def completion_logprobs(token_ids: list[int], entries: list[dict], num_top: int,
                        text_offset: int) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries):
        sampled = entry[token_id]
        out.tokens.append(sampled.decoded_token)
        out.token_logprobs.append(_finite(sampled.logprob))
        out.text_offset.append(text_offset)
        text_offset += len(sampled.decoded_token)
        top = sorted((lp for lp in entry.values() if lp.rank is not None and lp.rank <= num_top),
                     key=lambda lp: lp.rank)
        out.top_logprobs.append({lp.decoded_token: _finite(lp.logprob) for lp in top} if num_top else None)
    return out


def echo_logprobs(prompt_token_ids: list[int], entries: list[dict | None], num_top: int,
                  token_text) -> CompletionLogprobs:
    """The prompt's part of an echoed completion's logprobs: `entries` are RequestOutput.prompt_logprobs (None for
    the first token and placeholders, whose logprob and top are null); `token_text(id)` names a None entry's token."""
    out = CompletionLogprobs()
    offset = 0
    for token_id, entry in zip(prompt_token_ids, entries):
        if entry is None:
            text = token_text(token_id)
            out.tokens.append(text)
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            out.text_offset.append(offset)
            offset += len(text)
        else:
            part = completion_logprobs([token_id], [entry], num_top, offset)
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(out, name).extend(getattr(part, name))
            offset += len(part.tokens[0])
    return out


def join_logprobs(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    """`second` (a completion's, offsets from 0) after `first` (its echoed prompt's)."""
    shift = sum(len(t) for t in first.tokens)
    return CompletionLogprobs(text_offset=[*first.text_offset, *(o + shift for o in second.text_offset)],
                              token_logprobs=[*first.token_logprobs, *second.token_logprobs],
                              tokens=[*first.tokens, *second.tokens],
                              top_logprobs=[*first.top_logprobs, *second.top_logprobs])


def _finite(value: float) -> float:
    # JSON has no -inf; a token the model gives no probability at all gets the float32 floor instead
    return max(value, -9999.0)


def chat_response(body: ChatCompletionRequest, request_id: str, created: int, model: str,
                  final: RequestOutput) -> ChatCompletionResponse:
    choices = []
    for c in final.outputs:
        logprobs = chat_logprobs(c.token_ids, c.logprobs, body.top_logprobs or 0) if body.logprobs else None
        choices.append(ChatCompletionChoice(index=c.index, message=ChatMessage(content=c.text),
                                            logprobs=logprobs, finish_reason=c.finish_reason,
                                            stop_reason=c.stop_reason))
    num_completion = sum(len(c.token_ids) for c in final.outputs)
    return ChatCompletionResponse(id=request_id, created=created, model=model, choices=choices,
                                  usage=make_usage(len(final.prompt_token_ids), num_completion))


def completion_response(body: CompletionRequest, request_id: str, created: int, model: str,
                        finals: list[RequestOutput], tokenizer=None) -> CompletionResponse:
    """`tokenizer` is needed with `echo`: the prompt's text (for token-id prompts) and its unscored tokens."""
    choices, num_prompt, num_completion = [], 0, 0
    for prompt_index, final in enumerate(finals):
        num_prompt += len(final.prompt_token_ids)
        prefix, prefix_logprobs = "", None
        if body.echo:
            prefix = echo_text(final, tokenizer)
            if body.logprobs is not None:
                prefix_logprobs = echo_logprobs(final.prompt_token_ids, final.prompt_logprobs, body.logprobs,
                                                lambda t: tokenizer.decode([t]))
        for c in final.outputs:
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(c.token_ids, c.logprobs, body.logprobs, 0)
                if prefix_logprobs is not None:
                    logprobs = join_logprobs(prefix_logprobs, logprobs)
            choices.append(CompletionChoice(index=prompt_index * body.n + c.index, text=prefix + c.text,
                                            logprobs=logprobs,
                                            finish_reason=c.finish_reason, stop_reason=c.stop_reason))
            num_completion += len(c.token_ids)
    return CompletionResponse(id=request_id, created=created, model=model, choices=choices,
                              usage=make_usage(num_prompt, num_completion))


def echo_text(final: RequestOutput, tokenizer) -> str:
    """The prompt as echoed: its own text, or its token ids decoded (special tokens kept, as vLLM echoes them)."""
    return final.prompt if final.prompt is not None else tokenizer.decode(final.prompt_token_ids)

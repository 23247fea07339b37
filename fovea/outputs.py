"""What `LLM.generate` returns: the shapes of vLLM's `RequestOutput`, `CompletionOutput` and `Logprob`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(slots=True)
class Logprob:
    """One token's log-probability under the model's raw distribution (before temperature and filters).

    `rank` is 1 for the most likely token of the step; `decoded_token` is the token's own text.
    """

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob, the sampled token first, then the top-k.
SampleLogprobs = list[dict[int, Logprob]]
# One entry per prompt token; the first is None (nothing predicts it).
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass(slots=True)
class CompletionOutput:
    """One of the `n` completions of a request.

    `finish_reason` is "stop" (EOS, a stop token id or a stop string), "length" (max_tokens or the context
    length), "abort", "error" (the model raised on this request alone: `stop_reason` is the exception's text;
    see fovea.engine.scheduler), or None while generating. Otherwise `stop_reason` is the stop token id or the
    stop string that ended it, None for EOS or any other reason.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (f"CompletionOutput(index={self.index}, text={self.text!r}, token_ids={self.token_ids}, "
                f"cumulative_logprob={self.cumulative_logprob}, logprobs={self.logprobs}, "
                f"finish_reason={self.finish_reason}, stop_reason={self.stop_reason!r})")


@dataclass(slots=True)
class RequestOutput:
    """Everything generated so far for one request (cumulative, as vLLM's default output kind).

    `num_cached_tokens` is how many prompt tokens were served from the prefix cache.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: PromptLogprobs | None = None
    num_cached_tokens: int | None = None

    def __repr__(self) -> str:
        return (f"RequestOutput(request_id={self.request_id!r}, prompt={self.prompt!r}, "
                f"prompt_token_ids={self.prompt_token_ids}, prompt_logprobs={self.prompt_logprobs}, "
                f"outputs={self.outputs}, finished={self.finished}, "
                f"num_cached_tokens={self.num_cached_tokens})")


@dataclass(slots=True)
class ModelRunnerOutput:
    """What the model runner hands back for one step: the requests that sampled, in batch order.

    A request in the middle of its prompt samples nothing and is not listed. `logprobs` is None when no
    request asked for them, else one entry per request (None where that request did not ask): the sampled
    token's and the top-k, `decoded_token` left for the output processor to fill.
    """

    req_ids: list[str]
    sampled_token_ids: list[list[int]]  # per request, this step's new token ids (one each today)
    logprobs: list[dict[int, Logprob] | None] | None = None
    # req id -> the prompt logprobs of prompt tokens 1..P-1 (None at placeholders), given once, in the step that
    # samples the request's first token (every chunk of its prompt computed them on the way)
    prompt_logprobs: dict[str, list[dict[int, Logprob] | None]] | None = None
    # req id -> why it cannot go on (its structured-outputs matcher reached a limit); its token list is empty
    errors: dict[str, str] | None = None

    @staticmethod
    def empty() -> "ModelRunnerOutput":
        return ModelRunnerOutput([], [], None)


@dataclass(slots=True)
class BeamSearchSequence:
    """One finished beam, as vLLM's: `tokens` are the prompt's and the generated ones, `logprobs` one dict per
    generated token (that step's top 2 * beam_width raw log-probabilities of the beam it grew from).

    `cum_logprob` is the sum of the generated tokens' log-probabilities; `score` is what beams are ranked by,
    transformers' `sequences_scores`: cum_logprob / (number of generated tokens, EOS included) ** length_penalty.
    `text` is the generated text (the final EOS left out, as vLLM does).
    """

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float = 0.0
    score: float = 0.0
    text: str | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    lora_request: object = None


@dataclass(slots=True)
class BeamSearchOutput:
    """What `LLM.beam_search` returns per prompt: the best `beam_width` sequences, best first."""

    sequences: list[BeamSearchSequence]

"""A request as the engine core keeps it: made by the input processor, owned by the scheduler.

Nothing past the scheduler reads a live `Request`: the runner gets its data once through `NewRequestData`
(scheduler_output.py) and keeps its own copy; the output processor sees only `RequestUpdate`s. Pure Python (no
torch here): the multimodal tensors and M-RoPE positions a request carries ride along opaquely, and only the
runner looks inside them.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3  # EOS, a stop token id or a stop string
    FINISHED_LENGTH = 4  # max_tokens or max_model_len
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6  # the model raised while computing it (fovea.engine.scheduler: failed steps)

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


@dataclass(slots=True)
class MultiModalFeature:
    """One multimodal item of a request and where its embeddings go in the prompt.

    `offset`/`length` give the placeholder run in the prompt's token ids. `is_embed` (None = all True)
    marks which of those `length` positions receive an embedding row; the encoder output for the item has
    exactly `sum(is_embed)` rows. `mm_hash` identifies the content (plus processing options), so equal
    images share encoder-cache entries and prefix-cache blocks, and different images never do.
    """

    modality: str
    offset: int
    length: int
    mm_hash: str
    data: dict[str, Any]  # the model's keyword inputs for this one item (e.g. pixel_values [1, 3, H, W])
    is_embed: list[bool] | None = None

    @property
    def num_embeds(self) -> int:
        return self.length if self.is_embed is None else sum(self.is_embed)

    @property
    def num_encoder_tokens(self) -> int:
        """What the encoder budget and the encoder cache count for this item."""
        return self.num_embeds


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: Any  # fovea.sampling_params.SamplingParams
    eos_token_id: int | None = None
    mm_features: list[MultiModalFeature] = field(default_factory=list)
    prompt: str | None = None
    arrival_index: int = 0
    # M-RoPE models: [3, num_prompt_tokens] positions (a torch tensor) and the delta for later tokens.
    mrope_positions: Any = None
    mrope_position_delta: int = 0
    lora_request: Any = None  # fovea.lora.request.LoRARequest, or None for the base model
    # Encoder-decoder models (T5): the encoder's prompt (multimodal placeholders and `mm_features` offsets are
    # in it); `prompt_token_ids` is then the decoder's prompt, [decoder_start_token_id]. None: decoder-only.
    encoder_prompt_token_ids: list[int] | None = None
    # Beam search (fovea.engine.beam_search): a finished sequence whose KV blocks stay held for forks, and a
    # fork's parent (a held sequence whose computed KV it starts from instead of a prefill).
    hold_kv: bool = False
    fork_parent: str | None = None

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0  # prefix-cache hit at first scheduling
    stop_reason: int | str | None = None

    def __post_init__(self) -> None:
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        # prefix-cache hashes of the full blocks of all_token_ids, extended incrementally by the KV cache manager
        self.block_hashes: list[bytes] = []

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_encoder_tokens(self) -> int:
        return len(self.encoder_prompt_token_ids) if self.encoder_prompt_token_ids is not None else 0

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token_ids(self, token_ids: int | list[int]) -> None:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)

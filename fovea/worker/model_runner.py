"""ModelRunner: the flat batch of one step -> sampled token ids.

It owns the model, the KV cache tensors (and their sizing), the encoder outputs and its own copy of every
request it runs (`CachedRequestState`), built from the scheduler's `NewRequestData` once and then updated from
ids and counts; it never reads the scheduler's live `Request`. Per step: update that state, run the encoder
for the items the scheduler asked for, build input ids / positions / attention metadata over all scheduled
tokens of all requests, merge multimodal embeddings into their placeholder rows, run the language model once,
take logits at each request's last scheduled token, sample, and append the sampled tokens to its own state.

In a worker process (fovea.executor.multiproc) the runner is one tensor-/pipeline-parallel rank: only the
sampling rank (`is_sampler`: the last stage's TP rank 0) samples and keeps generators and grammar matchers; the
other ranks append the tokens it drew when the next step's message brings them (`append_sampled_tokens`).
With pipeline stages (fovea.distributed.pipeline) the first stage runs the encoders and the embedding merge and
sends its hidden state on; a later stage receives it instead of embedding; the last computes logits.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from fovea import kernels
from fovea.config import EngineConfig
from fovea.distributed import parallel_state
from fovea.distributed.pipeline import recv_from_previous_stage, send_to_next_stage
from fovea.engine.request import MultiModalFeature
from fovea.engine.scheduler_output import SchedulerOutput
from fovea.engine.structured_output import CONSTRAINT_ERROR_PREFIX
from fovea.layers.attention import Attention, build_attention_metadata, forward_context
from fovea.layers.linear_methods import in_place_layers
from fovea.lora.layers import lora_context
from fovea.lora.manager import LoRAManager
from fovea.lora.request import LoRARequest
from fovea.models.interfaces import is_encoder_decoder, supports_output_rows
from fovea.models.packed_cache import open_cache
from fovea.models.weights import (file_backed_tensors, huge_page_layers, huge_page_policy, in_place_policy,
                                  load_model)
from fovea.outputs import ModelRunnerOutput
from fovea.sampling_params import SamplingParams
from fovea.worker import encoder_decoder
from fovea.worker.memory import lazily_zeroed, make_resident, measure_peak_bytes, trim_free_memory
from fovea.worker.profile_view import PROFILE_VIEW_MARGIN, profile_view
from fovea.worker.sampler import Sampler, SamplingMetadata, SamplingRow, gather_logprobs, seeded_generator

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, hf_config) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if dtype in (torch.float16, torch.bfloat16):
        return torch.bfloat16  # float16 matmuls are slow on CPU; bfloat16 keeps the range
    return torch.float32


@dataclass(slots=True, eq=False)
class CachedRequestState:
    """The runner's own record of one request, kept from its first step until it finishes (preemption
    included: a resumed request gets a new block table and recomputes from its `num_computed_tokens`)."""

    req_id: str
    token_ids: list[int]  # prompt + every token sampled so far
    output_token_ids: list[int]  # the sampled ones (shared with `sampling`, which the penalties read)
    mm_features: list[MultiModalFeature]
    block_ids: list[int]
    num_computed_tokens: int  # tokens whose KV is written, as of the end of the last step it ran
    mrope_positions: torch.Tensor | None  # [3, num_prompt_tokens] for M-RoPE models
    mrope_position_delta: int
    sampling: SamplingRow  # built once; its generator (seeded requests) lives as long as the request
    lora_request: LoRARequest | None = None
    encoder_prompt_token_ids: list[int] | None = None  # encoder-decoder models (fovea.worker.encoder_decoder)
    cross_block_ids: list[int] | None = None
    # prompt_logprobs requests: entries for prompt tokens 1.. computed so far (kept across preemption, so a
    # recomputed chunk adds none twice), and whether they were handed out (with the first sampled token)
    prompt_logprobs: list | None = None
    prompt_logprobs_sent: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config, model_cls: type[nn.Module]):
        self.config = config
        self.hf_config = hf_config
        self.dtype = resolve_dtype(config.dtype, hf_config)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        # process-wide: which CPU paths the layers below take (builds the C++ kernels unless "off"; logged once)
        self.cpu_kernels = kernels.configure(config.cpu_kernels)
        policy, why = in_place_policy(config.in_place_weights, config.model, self.dtype)
        logger.info("in-place weights: %r (%s)", policy, why)
        self.in_place_weights = policy
        self.packed_cache = open_cache(config.packed_weights_cache, config.model, self.dtype)
        self.huge_pages, why = huge_page_policy(config.huge_pages, cached=self.packed_cache is not None)
        logger.info("packed weights on 2 MiB pages: %r (%s)", self.huge_pages, why)
        # read as each layer's method and pages are chosen
        with in_place_layers(policy), huge_page_layers(self.huge_pages):
            self.model, self.num_prepacked_linears = load_model(
                model_cls, hf_config, config.model, self.dtype, config.quantization, config.quantize_lm_head,
                packed_cache=self.packed_cache)
        if self.packed_cache is not None:
            logger.info("packed weights cache: %s", self.packed_cache.summary())
        # weights that run from the checkpoint's page cache (fovea.layers.linear_methods.BF16RowsLinearMethod):
        # mapped in now, and kept out of the KV cache's budget (determine_num_kv_blocks)
        in_place = file_backed_tensors(self.model)
        make_resident(in_place)
        self.file_backed_weight_bytes = sum(t.nbytes for t in in_place)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.lora_manager = LoRAManager(
            self.model, max_loras=config.max_loras, max_lora_rank=config.max_lora_rank,
            max_cpu_loras=config.max_cpu_loras, dtype=self.dtype) if config.enable_lora else None
        self.sampler = Sampler()
        # structured outputs: set by the engine, which owns the tokenizer (fovea.engine.structured_output)
        self.grammar_compiler = None
        # unseeded random rows draw from this: `EngineConfig.seed` makes a whole run repeat exactly
        self.generator = seeded_generator(config.seed)
        self.requests: dict[str, CachedRequestState] = {}
        self.encoder_cache: dict[str, torch.Tensor] = {}  # mm_hash -> [num_embeds, hidden]
        self.block_size = config.block_size
        self.num_blocks = 0
        self.vocab_size = self.model.get_text_config().vocab_size
        self.is_encoder_decoder = is_encoder_decoder(hf_config)
        self.max_num_encoder_tokens = 0  # encoder-decoder: the encoder prompt of the profiled worst-case step
        # one rank samples (its generators are the only ones, so sampling repeats exactly as in one process)
        self.is_sampler = parallel_state.is_last_stage() and parallel_state.tp_rank() == 0
        self.is_first_stage, self.is_last_stage = parallel_state.is_first_stage(), parallel_state.is_last_stage()
        self.is_pipelined = parallel_state.pp_size() > 1
        # prefill steps read one row per request: such a model skips the rest in its last layer (not across a
        # pipeline's stages, whose boundary carries every row, nor in an encoder-decoder's decoder: BLIP-2 declares
        # it for its decoder-only LMs, and its T5 LM does not honour it)
        self.prunes_output_rows = supports_output_rows(model_cls) and not self.is_pipelined \
            and not self.is_encoder_decoder

    # ---- KV cache -------------------------------------------------------------------------------------

    def kv_bytes_per_block(self) -> int:
        element = torch.finfo(self.dtype).bits // 8
        per_token = sum(2 * a.num_kv_heads * a.head_dim for a in self.attention_layers) * element
        return per_token * self.block_size

    def determine_num_kv_blocks(self, max_model_len: int, max_num_batched_tokens: int,
                                profile_features: list[MultiModalFeature]) -> int:
        """KV blocks for this engine (the scheduler's null block 0 included): `num_kv_blocks` as given, else
        `kv_cache_memory_bytes`, else `memory_utilization` of available memory minus what a worst-case step
        (`profile_features` encoded, `max_num_batched_tokens` through the LM) really allocates."""
        config = self.config
        # +1: block 0 is the scheduler's reserved null block; an encoder-decoder's cross blocks double it
        blocks_per_seq = math.ceil(max_model_len / config.block_size) * (2 if self.is_encoder_decoder else 1) + 1
        if config.num_kv_blocks is not None:
            return config.num_kv_blocks
        per_block = self.kv_bytes_per_block()
        if config.kv_cache_memory_bytes is not None:
            num_blocks = config.kv_cache_memory_bytes // per_block
        else:
            self.max_num_encoder_tokens = max_model_len
            peak = self.profile_peak_bytes(min(max_num_batched_tokens, max_model_len), profile_features)
            # the ranks of a multi-process engine share this host's memory equally
            world_size = parallel_state.layout().world_size
            share = config.memory_utilization / world_size
            # MemAvailable counts the page cache, so the file pages the in-place weights run from look available:
            # a KV cache sized into them would make the kernel evict the weights, and decode read them from disk.
            # Taken out first, as weights of the process's own memory are; every rank holds about as much (the
            # engine takes the smallest count, so the rank holding the most decides)
            available = available_memory_bytes() - world_size * self.file_backed_weight_bytes
            budget = int(max(0, available) * share) - peak
            # never more than every running sequence at full length could use
            num_blocks = min(max(0, budget) // per_block, config.max_num_seqs * blocks_per_seq)
        if num_blocks < blocks_per_seq:
            raise ValueError(
                f"the KV cache has room for {num_blocks} blocks of {config.block_size} tokens, fewer than one "
                f"max_model_len={max_model_len} sequence needs ({blocks_per_seq}, with the reserved null block); "
                f"give more memory or lower max_model_len"
            )
        return num_blocks

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        num_slots = num_blocks * self.block_size
        for layer in self.attention_layers:
            # zeros, not empty: masked-out keys still pass through the softmax-times-V product
            shape = (num_slots, layer.num_kv_heads, layer.head_dim)
            layer.kv_cache = (lazily_zeroed(shape, self.dtype), lazily_zeroed(shape, self.dtype))

    def profile_peak_bytes(self, num_tokens: int, encoder_items: list[MultiModalFeature]) -> int:
        """The memory a worst-case step (encoder over `encoder_items`, then the LM over `num_tokens`) takes at its
        peak, above what the process held just before (fovea.worker.memory), KV entries aside (the KV cache is
        budgeted on its own). The step runs through `profile_view` (not an encoder-decoder model's): each stack of
        like layers cut to its first and last layer (of each kind), which reaches the same peak reading ~2/L of the
        weights; its reading is raised by `PROFILE_VIEW_MARGIN`."""
        blocks = -(-num_tokens // self.block_size)
        num_cross = -(-self.max_num_encoder_tokens // self.block_size) if self.is_encoder_decoder else 0
        self.allocate_kv_cache(blocks + num_cross)
        try:
            # whole: an encoder-decoder step (it reaches into every decoder layer outside its forward: T5 writes
            # each one's cross K/V; its steps are short), and a 1-token step (a decode step, which Llama decides its
            # fused decode plan on, from its layers: never from the view's; it reads the weights once anyway)
            whole = self.is_encoder_decoder or num_tokens == 1
            view = contextlib.nullcontext([]) if whole else profile_view(self.model)
            with view as skipped:
                left_out = {id(m) for layer in skipped for m in layer.modules()}
                for layer in self.attention_layers:  # the pages the step writes KV into, resident before it starts
                    if id(layer) not in left_out:
                        for cache in layer.kv_cache:
                            cache.fill_(0)
                trim_free_memory()
                peak = measure_peak_bytes(lambda: self._profile_step(num_tokens, encoder_items))[1]
            return math.ceil(peak * (PROFILE_VIEW_MARGIN if skipped else 1.0))
        finally:
            self.encoder_cache.clear()
            for layer in self.attention_layers:
                layer.kv_cache = None

    @torch.inference_mode()
    def _profile_step(self, num_tokens: int, encoder_items: list[MultiModalFeature]) -> None:
        """Encode `encoder_items`, then run `num_tokens` (0: none) through the LM and take the logits the
        scheduler's largest step would: one row per sequence."""
        if encoder_items and self.is_first_stage:
            self._run_encoder(encoder_items)
        if num_tokens == 0:
            return
        if self.is_encoder_decoder:
            encoder_decoder.profile_step(self.model, num_tokens, self.max_num_encoder_tokens, self.block_size,
                                         first_cross_block=-(-num_tokens // self.block_size))
            return
        blocks = -(-num_tokens // self.block_size)
        ids = torch.zeros(num_tokens, dtype=torch.long)
        meta = build_attention_metadata([num_tokens], [num_tokens], [list(range(blocks))], self.block_size)
        embeds = self.model.embed_input_ids(ids) if self.is_first_stage else None
        received = None if self.is_first_stage else {  # what the previous stage would send
            name: torch.zeros(shape, dtype=self.dtype)
            for name, shape in self.model.intermediate_shapes(num_tokens).items()}
        with forward_context(meta):
            hidden = self.model(ids, torch.arange(num_tokens), inputs_embeds=embeds, **self._stage_kwargs(received))
        if self.is_last_stage:
            rows = min(num_tokens, self.config.max_num_seqs)
            self.model.compute_logits(hidden[-rows:])

    def add_lora(self, lora_request: LoRARequest) -> None:
        if self.lora_manager is None:
            raise ValueError(f"LoRA adapter {lora_request.lora_name!r} requested, but the engine was started "
                             f"without enable_lora=True")
        self.lora_manager.add_adapter(lora_request)

    # ---- one step ---------------------------------------------------------------------------------------

    def _update_states(self, out: SchedulerOutput) -> None:
        for req_id in out.finished_request_ids:
            self.requests.pop(req_id, None)
        for mm_hash in out.freed_mm_hashes:
            self.encoder_cache.pop(mm_hash, None)
        for new in out.scheduled_new_reqs:
            params: SamplingParams = new.sampling_params
            output_token_ids: list[int] = []
            generator = seeded_generator(params.seed) if params.seed is not None else None
            self.requests[new.req_id] = CachedRequestState(
                req_id=new.req_id, token_ids=list(new.prompt_token_ids), output_token_ids=output_token_ids,
                mm_features=new.mm_features, block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens, mrope_positions=new.mrope_positions,
                mrope_position_delta=new.mrope_position_delta,
                sampling=SamplingRow(params=params, prompt_token_ids=new.prompt_token_ids,
                                     output_token_ids=output_token_ids, generator=generator,
                                     eos_token_id=new.eos_token_id, grammar=self._new_matcher(params)),
                lora_request=new.lora_request, encoder_prompt_token_ids=new.encoder_prompt_token_ids,
                cross_block_ids=list(new.cross_block_ids),
                prompt_logprobs=[] if params.prompt_logprobs is not None else None,
            )
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self.requests[req_id]
            state.num_computed_tokens = cached.num_computed_tokens[i]
            if cached.resumed_from_preemption[i]:
                state.block_ids = list(cached.new_block_ids[i])
                if state.encoder_prompt_token_ids is not None:
                    state.cross_block_ids = list(cached.new_cross_block_ids[i])
            else:
                state.block_ids.extend(cached.new_block_ids[i])

    def append_sampled_tokens(self, sampled: dict[str, list[int]]) -> None:
        """A rank that does not sample: take the tokens the sampling rank drew last step (before this step's
        update, so a request that finished since is dropped right after)."""
        for req_id, tokens in sampled.items():
            state = self.requests.get(req_id)
            if state is not None:
                state.token_ids.extend(tokens)
                state.output_token_ids.extend(tokens)

    def _new_matcher(self, params: SamplingParams):
        if params.structured_outputs is None or not self.is_sampler:
            return None
        if self.grammar_compiler is None:
            raise ValueError("structured_outputs needs the engine's grammar compiler (LLMEngine sets it)")
        return self.grammar_compiler.matcher(params.structured_outputs)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(out)
        if out.blocks_to_copy:
            self._copy_blocks(out.blocks_to_copy)
        if not out.num_scheduled_tokens:
            return ModelRunnerOutput.empty()
        if out.scheduled_encoder_inputs and self.is_first_stage:
            self._run_encoder([self.requests[req_id].mm_features[i]
                               for req_id, indices in out.scheduled_encoder_inputs.items() for i in indices])
        if out.scheduled_encoder_prompts:
            states = [self.requests[req_id] for req_id in out.scheduled_encoder_prompts]
            encoder_decoder.run_encoder_prompts(
                self.model, [(s.encoder_prompt_token_ids, s.mm_features, s.cross_block_ids) for s in states],
                self.block_size, lambda f: _embed_rows(f, self.encoder_cache[f.mm_hash], 0, f.length))

        num_tokens = out.total_num_scheduled_tokens
        input_ids: list[int] = []
        positions: list = []  # ints (1-D positions) or [3, n] tensors (M-RoPE)
        is_mm = None  # [num_tokens] bool once a placeholder row is scheduled (never in a decode step)
        query_lens, context_lens, block_tables = [], [], []
        mm_rows, logits_index, sampled, sampled_requests = [], [], [], []
        lora_rows: list[tuple[LoRARequest, int, int]] = []  # (adapter, first flat row, count) per request
        prompt_rows: list[tuple[int, CachedRequestState, int]] = []  # (flat row, request, prompt position)
        start = 0
        for req_index, (req_id, n) in enumerate(out.num_scheduled_tokens.items()):
            state = self.requests[req_id]
            c = state.num_computed_tokens
            end = c + n
            input_ids.extend(state.token_ids[c:end])
            if state.mrope_positions is None:
                positions.extend(range(c, end))
            else:
                positions.append(_mrope_positions(state, c, n))
            embeds_here = state.encoder_prompt_token_ids is None and self.is_first_stage
            for feature in state.mm_features if embeds_here else ():
                lo, hi = max(c, feature.offset), min(end, feature.offset + feature.length)
                if lo >= hi:
                    continue
                rows, local_mask = _embed_rows(feature, self.encoder_cache[feature.mm_hash], lo - feature.offset,
                                               hi - feature.offset)
                if is_mm is None:
                    is_mm = torch.zeros(num_tokens, dtype=torch.bool)
                is_mm[start + lo - c:start + hi - c] = local_mask
                mm_rows.append(rows)
            if state.lora_request is not None:
                lora_rows.append((state.lora_request, start, n))
            if state.prompt_logprobs is not None:
                # row p's logits score prompt token p + 1; positions scored before a preemption are not redone
                num_prompt = len(state.sampling.prompt_token_ids)
                for p in range(max(c, len(state.prompt_logprobs)), min(end, num_prompt - 1)):
                    prompt_rows.append((start + p - c, state, p + 1))
            start += n
            query_lens.append(n)
            context_lens.append(end)
            block_tables.append(state.block_ids)
            state.num_computed_tokens = end
            if end == len(state.token_ids):  # the chunk reached the last known token: sample the next one
                logits_index.append(start - 1)
                sampled.append(state)
                sampled_requests.append(req_index)

        ids = torch.tensor(input_ids, dtype=torch.long)
        # only the logits rows come out of the model (every row when something else reads them)
        is_pruned = self.prunes_output_rows and 0 < len(logits_index) < num_tokens and not prompt_rows \
            and not lora_rows
        meta = build_attention_metadata(query_lens, context_lens, block_tables, self.block_size,
                                        sampled_requests if is_pruned else None)
        if self.is_encoder_decoder:
            states = [self.requests[req_id] for req_id in out.num_scheduled_tokens]
            encoder_decoder.attach_cross_metadata(meta, query_lens, [len(s.encoder_prompt_token_ids) for s in states],
                                                  [s.cross_block_ids for s in states], self.block_size)
        if positions and isinstance(positions[0], torch.Tensor):
            positions = torch.cat(positions, dim=1) if len(positions) > 1 else positions[0]
        else:
            positions = torch.tensor(positions, dtype=torch.long)
        embeds = received = None
        if self.is_first_stage:
            embeds = self.model.embed_input_ids(ids, mm_rows or None, is_mm if mm_rows else None)
        else:
            received = recv_from_previous_stage(self.model.intermediate_shapes(num_tokens), self.dtype)
        lora_mapping = self.lora_manager.prepare_step(lora_rows) if lora_rows else None
        with forward_context(meta), lora_context(lora_mapping):
            hidden = self.model(ids, positions, inputs_embeds=embeds, **self._stage_kwargs(received))
        if not self.is_last_stage:
            send_to_next_stage(hidden)
            return ModelRunnerOutput.empty()
        if prompt_rows:
            self._prompt_logprobs(hidden, prompt_rows)
        if not sampled:
            return ModelRunnerOutput.empty()
        # every scheduled token sampled (a decode-only step): rows 0..N-1 in order, the hidden state itself
        if not is_pruned and len(logits_index) != num_tokens:
            hidden = hidden[torch.tensor(logits_index)]
        if not self.is_sampler:
            # a vocabulary-parallel lm_head gathers over the TP group: take part
            self.model.compute_logits(hidden)
            return ModelRunnerOutput.empty()
        logits = self.model.compute_logits(hidden)  # the sampler widens if it must
        sampling = SamplingMetadata.build([s.sampling for s in sampled], self.vocab_size, logits.device,
                                          default_generator=self.generator)
        result = self.sampler(logits, sampling)
        tokens = result.sampled_token_ids.tolist()
        errors = {}
        for state, token in zip(sampled, tokens):
            grammar = state.sampling.grammar
            # a matcher that reached a limit computing this mask (or refuses the token) ends its request alone
            if grammar is not None and (grammar.is_error() or not grammar.consume_token(token)):
                errors[state.req_id] = self.grammar_compiler.describe_error(CONSTRAINT_ERROR_PREFIX, grammar.get_error())
                continue
            state.token_ids.append(token)
            state.output_token_ids.append(token)
        logprobs = result.logprobs.to_dicts() if result.logprobs is not None else None
        prompt_logprobs = {}
        for state in sampled:
            if state.prompt_logprobs is not None and not state.prompt_logprobs_sent:
                prompt_logprobs[state.req_id], state.prompt_logprobs_sent = state.prompt_logprobs, True
        return ModelRunnerOutput([s.req_id for s in sampled],
                                 [[] if s.req_id in errors else [t] for s, t in zip(sampled, tokens)], logprobs,
                                 prompt_logprobs or None, errors or None)

    def _stage_kwargs(self, received) -> dict:
        """A split model's forward takes the previous stage's tensors; other models keep their signature."""
        return {"intermediate_tensors": received} if self.is_pipelined else {}

    def _prompt_logprobs(self, hidden: torch.Tensor, rows: list[tuple[int, CachedRequestState, int]]) -> None:
        """Score prompt tokens (raw log_softmax, float32) and append them to their requests; a multimodal
        placeholder gets None (its row takes an embedding, not a token). In slices of rows, so a long prompt never
        holds [prompt_len, vocab] logits at once."""
        for first in range(0, len(rows), _PROMPT_LOGPROBS_ROWS):
            part = rows[first:first + _PROMPT_LOGPROBS_ROWS]
            logits = self.model.compute_logits(hidden[torch.tensor([r for r, _, _ in part])]).float()
            targets = torch.tensor([state.token_ids[q] for _, state, q in part])
            nums = [state.sampling.params.prompt_logprobs for _, state, _ in part]
            entries = gather_logprobs(torch.log_softmax(logits, dim=-1), nums, targets).to_dicts()
            for (_, state, q), entry in zip(part, entries):
                state.prompt_logprobs.append(None if _is_placeholder(state.mm_features, q) else entry)

    def _copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole KV blocks (a forked beam's partial last block) in every layer, before the step writes."""
        bs = self.block_size
        src = torch.cat([torch.arange(s * bs, (s + 1) * bs) for s, _ in pairs])
        dst = torch.cat([torch.arange(d * bs, (d + 1) * bs) for _, d in pairs])
        for layer in self.attention_layers:
            for cache in layer.kv_cache:  # (num_slots, kv_heads, head_dim)
                cache[dst] = cache[src]

    def _run_encoder(self, features: list[MultiModalFeature]) -> None:
        """Encode every listed item, batched per input kind, into the encoder cache."""
        pending = [f for f in features if f.mm_hash not in self.encoder_cache]
        by_key: dict[tuple, list[MultiModalFeature]] = {}
        for f in pending:
            by_key.setdefault((f.modality, tuple(sorted(f.data))), []).append(f)
        for (_, keys), group in by_key.items():
            unique: dict[str, MultiModalFeature] = {f.mm_hash: f for f in group}
            kwargs = {k: torch.cat([f.data[k] for f in unique.values()]) for k in keys}
            kwargs = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in kwargs.items()}
            outputs = self.model.embed_multimodal(**kwargs)
            for mm_hash, embeds in zip(unique, outputs):
                self.encoder_cache[mm_hash] = embeds


_PROMPT_LOGPROBS_ROWS = 256


def _is_placeholder(features: list[MultiModalFeature], position: int) -> bool:
    for f in features:
        if f.offset <= position < f.offset + f.length:
            return f.is_embed is None or f.is_embed[position - f.offset]
    return False


def _mrope_positions(state: CachedRequestState, c: int, n: int) -> torch.Tensor:
    """M-RoPE positions [3, n] of tokens [c, c+n): the prompt's own, then p + delta on all three rows."""
    if c >= state.mrope_positions.shape[1]:  # past the prompt (every decode step): two ops, not five
        delta = state.mrope_position_delta
        return torch.arange(c + delta, c + n + delta).repeat(3, 1)
    prompt = state.mrope_positions[:, c:c + n]
    if prompt.shape[1] == n:
        return prompt
    later = torch.arange(c + prompt.shape[1], c + n) + state.mrope_position_delta
    return torch.cat([prompt, later.expand(3, -1)], dim=1)


def _embed_rows(feature: MultiModalFeature, embeds: torch.Tensor, lo: int, hi: int):
    """Rows of an item's embeddings for its placeholder positions [lo, hi), and which positions take them."""
    if feature.is_embed is None:
        return embeds[lo:hi], torch.ones(hi - lo, dtype=torch.bool)
    local = torch.tensor(feature.is_embed[lo:hi], dtype=torch.bool)
    first = sum(feature.is_embed[:lo])
    return embeds[first:first + int(local.sum())], local


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30

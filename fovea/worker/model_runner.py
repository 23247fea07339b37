"""ModelRunner: the flat batch of one step -> sampled token ids.

It owns the model, the KV cache tensors, the encoder outputs and per-request sampling state. Per step:
run the encoder for the items the scheduler asked for, build input ids / positions / attention metadata
over all scheduled tokens of all requests, merge multimodal embeddings into their placeholder rows, run
the language model once, take logits at each request's last scheduled token, sample.
"""
from __future__ import annotations

import resource
from dataclasses import dataclass

import torch
from torch import nn

from fovea.config import EngineConfig
from fovea.engine.request import MultiModalFeature
from fovea.engine.scheduler import SchedulerOutput
from fovea.layers.attention import Attention, build_attention_metadata, forward_context
from fovea.layers.linear import prepack_linear_weights
from fovea.models.weights import load_weights
from fovea.worker.sampler import Sampler, SamplingMetadata, SamplingRow

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


@dataclass(slots=True)
class ModelRunnerOutput:
    sampled_token_ids: dict[str, list[int]]
    logprobs: dict[str, list]  # request id -> [dict[token id, Logprob]] for requests that asked for them


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config, model_cls: type[nn.Module]):
        self.config = config
        self.hf_config = hf_config
        self.dtype = resolve_dtype(config.dtype, hf_config)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            self.model = model_cls(hf_config)
        finally:
            torch.set_default_dtype(previous)
        for name in getattr(self.model, "keep_in_fp32_modules", ()):
            # as transformers does: these stay float32 whatever the model dtype (BLIP-2's Q-Former)
            target = self.model.get_parameter(name) if "." not in name and isinstance(
                getattr(self.model, name, None), nn.Parameter) else self.model.get_submodule(name)
            if isinstance(target, nn.Parameter):
                target.data = target.data.float()
            else:
                target.float()
        load_weights(self.model, config.model)
        self.model.eval().requires_grad_(False)
        self.num_prepacked_linears = prepack_linear_weights(self.model)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.sampler = Sampler()
        self.generators: dict[str, torch.Generator] = {}
        self.encoder_cache: dict[str, torch.Tensor] = {}
        self.block_size = config.block_size
        self.num_blocks = 0
        self.vocab_size = self.model.get_text_config().vocab_size

    # ---- KV cache -------------------------------------------------------------------------------------

    def kv_bytes_per_block(self) -> int:
        element = torch.finfo(self.dtype).bits // 8
        per_token = sum(2 * a.num_kv_heads * a.head_dim for a in self.attention_layers) * element
        return per_token * self.block_size

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        num_slots = num_blocks * self.block_size
        for layer in self.attention_layers:
            # zeros, not empty: masked-out keys still pass through the softmax-times-V product
            shape = (num_slots, layer.num_kv_heads, layer.head_dim)
            layer.kv_cache = (torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype))

    def profile_peak_bytes(self, num_tokens: int, encoder_items: list[MultiModalFeature]) -> int:
        """Run the worst-case step once (encoder + LM over `num_tokens`) and return the RSS it added."""
        blocks = -(-num_tokens // self.block_size)
        self.allocate_kv_cache(blocks)
        before = _max_rss_bytes()
        with torch.inference_mode():
            if encoder_items:
                self._run_encoder(encoder_items)
            ids = torch.zeros(num_tokens, dtype=torch.long)
            meta = build_attention_metadata([num_tokens], [num_tokens], [list(range(blocks))], self.block_size)
            with forward_context(meta):
                hidden = self.model(ids, torch.arange(num_tokens), inputs_embeds=self.model.embed_input_ids(ids))
            self.model.compute_logits(hidden[-min(num_tokens, self.config.max_num_seqs):])
        self.encoder_cache.clear()
        for layer in self.attention_layers:
            layer.kv_cache = None
        return max(0, _max_rss_bytes() - before)

    # ---- one step ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in out.finished_request_ids:
            self.generators.pop(req_id, None)
        for mm_hash in out.freed_mm_hashes:
            self.encoder_cache.pop(mm_hash, None)
        if not out.scheduled:
            return ModelRunnerOutput({}, {})

        to_encode = [s.request.mm_features[i] for s in out.scheduled for i in s.encoder_inputs]
        if to_encode:
            self._run_encoder(to_encode)

        num_tokens = out.num_scheduled_tokens
        input_ids: list[int] = []
        positions: list = []  # ints (1-D positions) or [3, n] tensors (M-RoPE)
        is_mm = torch.zeros(num_tokens, dtype=torch.bool)
        mm_rows, logits_index, sample_rows, sampled_reqs = [], [], [], []
        start = 0
        for s in out.scheduled:
            req, c, n = s.request, s.num_computed_tokens, s.num_new_tokens
            input_ids.extend(req.all_token_ids[c:c + n])
            if req.mrope_positions is None:
                positions.extend(range(c, c + n))
            else:
                positions.append(_mrope_positions(req, c, n))
            for feature in req.mm_features:
                lo, hi = max(c, feature.offset), min(c + n, feature.offset + feature.length)
                if lo >= hi:
                    continue
                rows, local_mask = _embed_rows(feature, self.encoder_cache[feature.mm_hash], lo - feature.offset,
                                               hi - feature.offset)
                is_mm[start + lo - c:start + hi - c] = local_mask
                mm_rows.append(rows)
            start += n
            if c + n == req.num_tokens:  # the chunk reached the last known token: sample the next one
                logits_index.append(start - 1)
                sampled_reqs.append(req)
                sample_rows.append(self._sampling_row(req))

        ids = torch.tensor(input_ids, dtype=torch.long)
        meta = build_attention_metadata(
            [s.num_new_tokens for s in out.scheduled],
            [s.num_computed_tokens + s.num_new_tokens for s in out.scheduled],
            [s.block_ids for s in out.scheduled],
            self.block_size,
        )
        positions = torch.cat(positions, dim=1) if positions and isinstance(positions[0], torch.Tensor) \
            else torch.tensor(positions, dtype=torch.long)
        embeds = self.model.embed_input_ids(ids, mm_rows or None, is_mm if mm_rows else None)
        with forward_context(meta):
            hidden = self.model(ids, positions, inputs_embeds=embeds)
        if not sampled_reqs:
            return ModelRunnerOutput({s.request.request_id: [] for s in out.scheduled}, {})
        logits = self.model.compute_logits(hidden[torch.tensor(logits_index)])  # the sampler widens if it must
        sampling = SamplingMetadata.build(sample_rows, self.vocab_size, logits.device)
        result = self.sampler(logits, sampling)
        tokens = result.sampled_token_ids.tolist()
        sampled = {s.request.request_id: [] for s in out.scheduled}
        logprobs = {}
        for row, req in enumerate(sampled_reqs):
            sampled[req.request_id] = [tokens[row]]
            if req.sampling_params.logprobs is not None:
                logprobs[req.request_id] = [result.row_logprobs(row)]
        return ModelRunnerOutput(sampled, logprobs)

    def _sampling_row(self, req) -> SamplingRow:
        params = req.sampling_params
        generator = None
        if params.seed is not None:
            generator = self.generators.get(req.request_id)
            if generator is None:
                generator = torch.Generator().manual_seed(params.seed)
                self.generators[req.request_id] = generator
        return SamplingRow(params=params, prompt_token_ids=req.prompt_token_ids,
                           output_token_ids=req.output_token_ids, generator=generator, eos_token_id=req.eos_token_id)

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


def _mrope_positions(req, c: int, n: int) -> torch.Tensor:
    """M-RoPE positions [3, n] of tokens [c, c+n): the prompt's own, then p + delta on all three rows."""
    prompt = req.mrope_positions[:, c:c + n]
    if prompt.shape[1] == n:
        return prompt
    later = torch.arange(c + prompt.shape[1], c + n) + req.mrope_position_delta
    return torch.cat([prompt, later.expand(3, -1)], dim=1)


def _embed_rows(feature: MultiModalFeature, embeds: torch.Tensor, lo: int, hi: int):
    """Rows of an item's embeddings for its placeholder positions [lo, hi), and which positions take them."""
    if feature.is_embed is None:
        return embeds[lo:hi], torch.ones(hi - lo, dtype=torch.bool)
    local = torch.tensor(feature.is_embed[lo:hi], dtype=torch.bool)
    first = sum(feature.is_embed[:lo])
    return embeds[first:first + int(local.sum())], local


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

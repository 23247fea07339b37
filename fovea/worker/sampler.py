"""Sampler: the last-position logits of each request -> its next token id (and logprobs if asked).

One step, in vLLM v1's order, all of it vectorised over the batch:

  0. grammar       rows with structured outputs are sampled apart (see `GrammarRows`): their logits copied,
                   the tokens their matcher forbids -> -inf (before the logprobs, as vLLM applies its bitmask
                   to the logits it hands the sampler), then steps 1-5 on those rows alone
  1. raw logprobs  log_softmax of the model's logits in float32, if any row asked for logprobs
  2. min_tokens    EOS and stop_token_ids -> -inf while the output is shorter than min_tokens
  3. penalties     repetition over prompt + output, presence and frequency over the output only
  4. greedy rows   argmax
  5. random rows   / temperature, min_p, top_k, top_p, softmax, then the exponential race

The exponential race picks argmax(p / q) with q ~ Exp(1), which is a draw from p. A seeded row draws its q
from its own generator, so its tokens depend on its seed and nothing else in the batch; the other random rows
draw from the engine's generator (seeded by `EngineConfig.seed`), so a run repeats exactly.

Rows without a constraint pay nothing for the ones that have one: the whole batch first takes the path it
would take if every constrained row were a plain greedy row (so an all-greedy batch keeps its fast argmax over
the model's own dtype, and no row is widened for the sake of another), then the constrained rows are sampled
again apart and written over their places. An unconstrained row's ids and logprobs are therefore bit-identical
to what the same rows give without the constrained ones (tested).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fovea import kernels
from fovea.outputs import Logprob
from fovea.sampling_params import SamplingParams

# top-p looks for its cut among this many most likely tokens before it sorts a whole row.
TOP_P_CANDIDATES = 256


@dataclass(slots=True)
class SamplingRow:
    """What the sampler needs to know about one request this step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None  # seeded requests only; the runner keeps it across steps
    eos_token_id: int | None = None
    grammar: Any = None  # structured outputs: the sequence's llguidance matcher (fovea.engine.structured_output)


@dataclass(slots=True)
class SamplingMetadata:
    """The per-row sampling options of one step, stacked into tensors. Build with `SamplingMetadata.build`."""

    temperature: torch.Tensor  # (B,) float32; 1.0 on greedy rows so that dividing is harmless
    is_greedy: torch.Tensor  # (B,) bool
    all_greedy: bool
    all_random: bool
    top_k: torch.Tensor | None  # (B,) int64, 0 = off; None when no row filters
    top_p: torch.Tensor | None  # (B,) float32, inf = off; None when no row filters
    min_p: torch.Tensor | None  # (B,) float32; None when no row filters
    generators: dict[int, torch.Generator]  # row -> generator, for seeded random rows
    default_generator: torch.Generator | None  # the other random rows; None = torch's global generator
    num_logprobs: list[int | None]  # per row, as asked
    max_num_logprobs: int | None  # None when no row asked
    no_penalties: bool
    repetition_penalty: torch.Tensor | None  # (B,) float32; None when every row has 1.0
    presence_penalty: torch.Tensor | None  # (B,) float32; None under no_penalties
    frequency_penalty: torch.Tensor | None  # (B,) float32; None under no_penalties
    prompt_token_ids: torch.Tensor | None  # (B, max_prompt_len) int64 padded with vocab_size
    output_token_ids: torch.Tensor | None  # (B, max_output_len) int64 padded with vocab_size
    min_tokens_mask: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) to set to -inf
    grammar: GrammarRows | None = None  # the rows with structured outputs, sampled apart

    @classmethod
    def build(cls, rows: list[SamplingRow], vocab_size: int, device: torch.device | str = "cpu",
              default_generator: torch.Generator | None = None) -> SamplingMetadata:
        params = [row.params for row in rows]
        is_greedy = [p.is_greedy for p in params]

        def floats(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        top_k = [p.top_k if 0 < p.top_k < vocab_size else 0 for p in params]
        top_p = [p.top_p if p.top_p < 1.0 else float("inf") for p in params]
        min_p = [p.min_p for p in params]

        generators: dict[int, torch.Generator] = {}
        for i, row in enumerate(rows):
            if is_greedy[i]:
                continue
            if row.params.seed is not None and row.generator is None:
                raise ValueError(f"row {i} has seed={row.params.seed} but no generator; the runner must keep "
                                 f"one per seeded request (see seeded_generator)")
            if row.generator is not None:
                generators[i] = row.generator

        num_logprobs = [p.logprobs for p in params]
        asked = [k for k in num_logprobs if k is not None]

        no_penalties = all(p.repetition_penalty == 1.0 and p.presence_penalty == 0.0
                           and p.frequency_penalty == 0.0 for p in params)
        has_repetition = any(p.repetition_penalty != 1.0 for p in params)

        min_rows, min_ids = [], []
        for i, row in enumerate(rows):
            if len(row.output_token_ids) >= row.params.min_tokens:
                continue
            # As vLLM: EOS is masked even under ignore_eos (it could only be an ordinary token then).
            stop_ids = set(row.params.stop_token_ids)
            if row.eos_token_id is not None:
                stop_ids.add(row.eos_token_id)
            for token_id in stop_ids:
                if 0 <= token_id < vocab_size:
                    min_rows.append(i)
                    min_ids.append(token_id)

        def long(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        constrained = [i for i, row in enumerate(rows) if row.grammar is not None]
        if constrained:
            # the batch's own pass sees each constrained row as a plain greedy row (no generator, logprobs or
            # penalties), so the flags and tensors below are the unconstrained rows' alone
            grammar = GrammarRows(
                rows=long(constrained), matchers=[rows[i].grammar for i in constrained],
                meta=cls.build([_without_grammar(rows[i]) for i in constrained], vocab_size, device,
                               default_generator),
                num_logprobs=[p.logprobs for p in params], is_whole_batch=len(constrained) == len(rows))
            meta = cls.build([_NEUTRAL_ROW if row.grammar is not None else row for row in rows], vocab_size,
                             device, default_generator)
            meta.grammar = grammar
            return meta

        return cls(
            temperature=floats([1.0 if g else p.temperature for g, p in zip(is_greedy, params)]),
            is_greedy=torch.tensor(is_greedy, dtype=torch.bool, device=device),
            all_greedy=all(is_greedy),
            all_random=not any(is_greedy),
            top_k=long(top_k) if any(top_k) else None,
            top_p=floats(top_p) if any(p < 1.0 for p in top_p) else None,
            min_p=floats(min_p) if any(min_p) else None,
            generators=generators,
            default_generator=default_generator,
            num_logprobs=num_logprobs,
            max_num_logprobs=max(asked) if asked else None,
            no_penalties=no_penalties,
            repetition_penalty=floats([p.repetition_penalty for p in params]) if has_repetition else None,
            presence_penalty=None if no_penalties else floats([p.presence_penalty for p in params]),
            frequency_penalty=None if no_penalties else floats([p.frequency_penalty for p in params]),
            prompt_token_ids=(_pad_token_ids([r.prompt_token_ids for r in rows], vocab_size, device)
                              if has_repetition else None),
            output_token_ids=(None if no_penalties else
                              _pad_token_ids([r.output_token_ids for r in rows], vocab_size, device)),
            min_tokens_mask=(long(min_rows), long(min_ids)) if min_rows else None,
        )


@dataclass(slots=True)
class GrammarRows:
    """The rows of a step with structured outputs: where they sit in the batch, their matchers, and their own
    sampling metadata (as if they were a batch of their own)."""

    rows: torch.Tensor  # (R,) int64 batch rows
    matchers: list[Any]  # one llguidance matcher per row, in order
    meta: SamplingMetadata  # of these R rows
    num_logprobs: list[int | None]  # of the whole batch, per row as asked
    is_whole_batch: bool  # every row is constrained: the batch's own pass would be wasted


# what a constrained row is in its batch's own pass: the cheapest row there is, and it asks for nothing
_NEUTRAL_ROW = SamplingRow(SamplingParams(temperature=0.0), [], [])


def _without_grammar(row: SamplingRow) -> SamplingRow:
    return SamplingRow(row.params, row.prompt_token_ids, row.output_token_ids, row.generator, row.eos_token_id)


def _pad_token_ids(seqs: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """(B, max_len) int64; padding and ids outside the logits (say a placeholder id past them) -> vocab_size,
    a spare bin that the counts drop."""
    max_len = max((len(s) for s in seqs), default=0)
    ids = torch.tensor([list(s) + [vocab_size] * (max_len - len(s)) for s in seqs], dtype=torch.int64, device=device)
    ids = ids.reshape(len(seqs), max_len)
    return ids.masked_fill((ids < 0) | (ids >= vocab_size), vocab_size)


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass(slots=True)
class LogprobsTensors:
    """Logprobs of one step for the whole batch, k = the largest number any row asked for.

    Column 0 is the sampled token, columns 1..k the top-k tokens, most likely first (their rank is their
    column). All values come from the raw logits: temperature, penalties and filters do not change them.
    """

    token_ids: torch.Tensor  # (B, k + 1) int64
    logprobs: torch.Tensor  # (B, k + 1) float32
    sampled_token_ranks: torch.Tensor  # (B,) int64, 1 = the most likely token
    num_logprobs: list[int | None]  # per row, as asked (None = not asked)

    def to_dicts(self) -> list[dict[int, Logprob] | None]:
        """Every row at once (one host copy per tensor)."""
        ids, lps, ranks = self.token_ids.tolist(), self.logprobs.tolist(), self.sampled_token_ranks.tolist()
        return [None if k is None else _row_dict(ids[i], lps[i], ranks[i], k) for i, k in enumerate(self.num_logprobs)]


def _row_dict(ids: list[int], lps: list[float], rank: int, num_logprobs: int) -> dict[int, Logprob]:
    out = {ids[0]: Logprob(lps[0], rank)}
    for column in range(1, min(num_logprobs, len(ids) - 1) + 1):
        # A sampled token that is also in the top-k keeps its entry (same logprob, rank from the count).
        out.setdefault(ids[column], Logprob(lps[column], column))
    return out


@dataclass(slots=True)
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # (B,) int64
    logprobs: LogprobsTensors | None  # None when no row asked


class Sampler:
    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """logits: (B, V) of the model, any float dtype; not modified."""
        grammar = meta.grammar
        if grammar is None:
            return self._sample(logits, meta)
        constrained = self._sample(masked_rows(logits, grammar), grammar.meta)
        if grammar.is_whole_batch:
            return constrained
        return merge_outputs(self._sample(logits, meta), constrained, grammar)

    def _sample(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        if (meta.all_greedy and meta.max_num_logprobs is None and meta.no_penalties
                and meta.min_tokens_mask is None):
            # the first maximum of the logits as they are: widening them to float32 cannot change it
            return SamplerOutput(_first_argmax(logits), None)
        logits = logits.float()  # every step below is out of place, so the caller's tensor stays as it was
        raw_logprobs = None
        if meta.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)  # (B, V)
        logits = apply_min_tokens(logits, meta)
        logits = apply_penalties(logits, meta)
        sampled = sample(logits, meta)
        logprobs = None
        if raw_logprobs is not None:
            logprobs = gather_logprobs(raw_logprobs, meta.num_logprobs, sampled)
        return SamplerOutput(sampled, logprobs)


def masked_rows(logits: torch.Tensor, grammar: GrammarRows) -> torch.Tensor:
    """(R, V) float32: a copy of the constrained rows of `logits`, the tokens each matcher forbids set to -inf.
    All R masks come from one llguidance call (its executor spreads them over threads)."""
    from fovea.engine.structured_output import mask_rows

    constrained = logits.index_select(0, grammar.rows).float()  # a new tensor: the caller's stays as it was
    mask_rows(constrained, grammar.matchers)
    return constrained


def merge_outputs(batch: SamplerOutput, constrained: SamplerOutput, grammar: GrammarRows) -> SamplerOutput:
    """The batch's own pass with the constrained rows' results written over their places."""
    sampled = batch.sampled_token_ids.index_copy(0, grammar.rows, constrained.sampled_token_ids)
    if batch.logprobs is None and constrained.logprobs is None:
        return SamplerOutput(sampled, None)
    # either pass may have asked for fewer columns (or none): pad to the wider; a row reads only its own k
    parts = [p.logprobs for p in (batch, constrained) if p.logprobs is not None]
    width = max(p.token_ids.shape[1] for p in parts)
    num_rows = sampled.shape[0]
    token_ids = torch.zeros(num_rows, width, dtype=torch.int64)
    logprobs = torch.zeros(num_rows, width, dtype=torch.float32)
    ranks = torch.zeros(num_rows, dtype=torch.int64)
    for part, rows in ((batch.logprobs, None), (constrained.logprobs, grammar.rows)):
        if part is None:
            continue
        k = part.token_ids.shape[1]
        if rows is None:
            token_ids[:, :k], logprobs[:, :k], ranks[:] = part.token_ids, part.logprobs, part.sampled_token_ranks
        else:
            token_ids[rows, :k], logprobs[rows, :k] = part.token_ids, part.logprobs
            ranks[rows] = part.sampled_token_ranks
    return SamplerOutput(sampled, LogprobsTensors(token_ids, logprobs, ranks, list(grammar.num_logprobs)))


def apply_min_tokens(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    if meta.min_tokens_mask is not None:
        rows, token_ids = meta.min_tokens_mask
        logits = logits.index_put((rows, token_ids), torch.tensor(float("-inf"), device=logits.device))
    return logits


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Only tokens a row has seen change, so gather those, penalise them and scatter them back; a full
    (B, V) pass would cost more than the rest of the step. Padding ids (= V) land in a spare column."""
    if meta.no_penalties:
        return logits
    vocab_size = logits.shape[1]
    padded = torch.nn.functional.pad(logits, (0, 1))  # (B, V + 1)
    output_ids = meta.output_token_ids  # (B, max_output_len)
    if meta.repetition_penalty is not None:
        seen = torch.cat([meta.prompt_token_ids, output_ids], dim=1)  # (B, P + O), repeats allowed
        values = padded.gather(1, seen)
        penalty = meta.repetition_penalty.unsqueeze(1)
        # Dividing a positive logit and multiplying a negative one both make the token less likely.
        values = torch.where(values > 0, values / penalty, values * penalty)
        padded.scatter_(1, seen, values)  # a repeated id writes the same value each time
    frequency = meta.frequency_penalty.unsqueeze(1).expand(output_ids.shape)
    padded.scatter_add_(1, output_ids, -frequency)  # once per occurrence
    values = padded.gather(1, output_ids) - meta.presence_penalty.unsqueeze(1)
    padded.scatter_(1, output_ids, values)  # once per distinct token
    return padded[:, :vocab_size]


def sample(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """(B, V) logits after penalties -> (B,) int64 token ids."""
    greedy = None if meta.all_random else _first_argmax(logits)
    if meta.all_greedy:
        return greedy
    drawn = exponential_race(compute_probs(logits, meta), meta.generators, meta.default_generator)
    return drawn if greedy is None else torch.where(meta.is_greedy, greedy, drawn)


def compute_probs(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """The distribution a random row draws from: softmax(logits / temperature) over the tokens that min_p,
    then top_k, then top_p keep, renormalised. (B, V) -> (B, V); `logits` is not modified.

    Works on w = exp(logit / T - max), which is 1 for the most likely token and orders tokens as the logits
    do. Each filter keeps the tokens whose w reaches a per-row threshold (ties with the last kept token stay),
    so they combine into one threshold applied once, as a float mask and a multiply: on CPU torch's boolean
    select (masked_fill, where) costs about fifteen times as much as arithmetic over the vocabulary.
    """
    weights = logits / meta.temperature.unsqueeze(1)  # (B, V), the only copy; the rest is in place
    weights.sub_(weights.amax(dim=-1, keepdim=True)).exp_()
    threshold = None  # (B, 1)
    if meta.min_p is not None:
        threshold = meta.min_p.unsqueeze(1)  # p >= min_p * p_max, and w_max = 1
    top_values = None
    if meta.top_k is not None:
        # Only the k-th value is needed: topk over the largest k, not a sort of the vocabulary.
        top_values = weights.topk(int(meta.top_k.max()), dim=-1).values  # (B, max_k), descending
        kth = top_values.gather(1, (meta.top_k.clamp(min=1) - 1).unsqueeze(1))
        kth = kth * (meta.top_k > 0).unsqueeze(1)  # off -> 0, which keeps everything
        threshold = kth if threshold is None else torch.maximum(threshold, kth)
    if meta.top_p is not None:
        threshold = _top_p_threshold(weights, threshold, top_values, meta)
    if threshold is not None:
        weights.mul_(torch.ge(weights, threshold, out=torch.empty_like(weights)))
    return weights.div_(weights.sum(dim=-1, keepdim=True))


def _top_p_threshold(weights: torch.Tensor, threshold: torch.Tensor | None, top_values: torch.Tensor | None,
                     meta: SamplingMetadata) -> torch.Tensor:
    """Raise `threshold` (B, 1) to the smallest weight of each row's nucleus: the fewest most likely tokens,
    among those min_p and top_k keep, whose probability reaches top_p.

    Sorting 150k weights per row would cost more than the rest of the step, and a nucleus is usually a few
    dozen tokens; so the cut is looked for among candidates (the row's top k when every row with top_p has
    one, else the top TOP_P_CANDIDATES), and only the rows whose cut lies further out are sorted.
    """
    num_rows, vocab_size = weights.shape
    top_p = meta.top_p
    is_off = torch.isinf(top_p)
    if threshold is None:
        threshold = torch.zeros(num_rows, 1, dtype=weights.dtype, device=weights.device)
    if top_values is not None and bool(((meta.top_k > 0) | is_off).all()):
        candidates = top_values * (top_values >= threshold)  # (B, max_k); all kept mass lies in here
        total = candidates.sum(dim=-1, keepdim=True)
    else:
        # The final mask is narrower than this one, so masking early changes nothing.
        weights.mul_(torch.ge(weights, threshold, out=torch.empty_like(weights)))
        total = weights.sum(dim=-1, keepdim=True)
        candidates = weights.topk(min(vocab_size, TOP_P_CANDIDATES), dim=-1).values  # (B, C)
    nucleus_min, is_found = _cut_top_p(candidates, total, top_p)
    is_found |= is_off | (candidates.shape[1] == vocab_size)
    if not bool(is_found.all()):
        rows = (~is_found).nonzero().squeeze(1)
        sorted_weights = weights[rows].sort(dim=-1, descending=True).values
        sorted_weights *= sorted_weights >= threshold[rows]
        nucleus_min[rows] = _cut_top_p(sorted_weights, total[rows], top_p[rows])[0]
    return torch.maximum(threshold, nucleus_min * ~is_off.unsqueeze(1))


def _cut_top_p(values: torch.Tensor, total: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values: (B, C) the C largest kept weights, descending (0 = dropped); total: (B, 1) sum of all kept.
    Returns the smallest weight of the nucleus (B, 1), right where the second result (B,) says the nucleus
    ends within these C."""
    mass = (values / total).cumsum(dim=-1)
    # A token is kept while the mass strictly before it is below p, so the most likely one always is.
    mass_before = torch.nn.functional.pad(mass[:, :-1], (1, 0))
    num_kept = (mass_before < top_p.unsqueeze(1)).sum(dim=-1, keepdim=True)
    # at least that one, also when top_p is so small (1e-60) that float32 holds it as 0 and nothing is below it
    return values.gather(1, num_kept.clamp(min=1) - 1), mass[:, -1] >= top_p


def exponential_race(probs: torch.Tensor, generators: dict[int, torch.Generator],
                     default_generator: torch.Generator | None = None) -> torch.Tensor:
    """argmax(probs / q), q ~ Exp(1): a draw from each row of probs. (B, V) -> (B,)"""
    u = torch.empty_like(probs)
    if len(generators) < probs.shape[0]:
        u.uniform_(generator=default_generator)
    for row, generator in generators.items():
        u[row].uniform_(generator=generator)
    # q = -log(u), u in [0, 1), is Exp(1): 5x cheaper on CPU than exponential_(), and never 0, so never 0 / 0.
    q = u.log_().neg_()
    return _first_argmax(torch.div(probs, q, out=q))


def _first_argmax(values: torch.Tensor) -> torch.Tensor:
    """(B, V) -> (B,) index of each row's first maximum, as argmax: fovea's CPU kernel when it applies
    (`fovea.kernels.first_argmax`), else torch's `max` (about 1.7x faster than `argmax` on CPU)."""
    if values.dim() == 2 and values.shape[1] > 0 and values.stride(1) == 1 and kernels.can_fuse(values):
        return kernels.first_argmax(values)
    return values.max(dim=-1).indices


def gather_logprobs(raw_logprobs: torch.Tensor, num_logprobs: list[int | None],
                    sampled: torch.Tensor) -> LogprobsTensors:
    """raw_logprobs: (B, V) log_softmax of the raw logits; num_logprobs: per row; sampled: (B,)."""
    sampled_logprobs = raw_logprobs.gather(1, sampled.unsqueeze(1))  # (B, 1)
    # int32 sum: summing bools into the default int64 costs 7x more on CPU.
    ranks = (raw_logprobs > sampled_logprobs).sum(dim=-1, dtype=torch.int32).long() + 1
    max_k = min(max((k for k in num_logprobs if k is not None), default=0), raw_logprobs.shape[1])
    token_ids, logprobs = sampled.unsqueeze(1), sampled_logprobs
    if max_k > 0:
        top_logprobs, top_ids = raw_logprobs.topk(max_k, dim=-1)
        token_ids = torch.cat([token_ids, top_ids], dim=1)
        logprobs = torch.cat([logprobs, top_logprobs], dim=1)
    return LogprobsTensors(token_ids, logprobs, ranks, list(num_logprobs))

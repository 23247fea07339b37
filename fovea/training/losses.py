"""The BLIP-2 Q-Former's training losses, as plain functions of tensors (no model in here).

Stage 1 sums three losses: image-text contrastive (ITC), image-text matching (ITM) with hard negatives, and
image-grounded text generation (ITG). Stage 2 trains through a frozen LLM with a plain LM loss on the caption.

Shapes: b = local batch (this process), N = global batch (b * world size), Q = query tokens, D = embedding
width, T = text length, V = vocabulary. "Global" tensors are the concatenation of every rank's local tensor
in rank order, so local row i is global row `rank * b + i`. In one process, N = b, rank = 0 and every
`all_*` argument may be left out.

Distributed use of ITC (equal gradients to one process on the global batch; see `distributed.py`)::

    all_image_feats = all_gather_with_grad(image_feats)        # (N, Q, D), gradients flow back per rank
    all_text_feats = all_gather_with_grad(text_feats)          # (N, D)
    all_image_ids = concat_all_gather(image_ids)               # (N,)
    loss = itc_loss(image_feats, text_feats, temp, image_ids=image_ids, all_image_feats=all_image_feats,
                    all_text_feats=all_text_feats, all_image_ids=all_image_ids, rank=rank)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""Label of positions that take no part in a token loss (cross_entropy's default ignore_index)."""


# ---------------------------------------------------------------- image-text contrastive (ITC)


@dataclass(slots=True)
class ItcLogits:
    i2t: torch.Tensor
    """(b, N): local image i against global text j, max over queries of cos(q, t), divided by temperature."""
    t2i: torch.Tensor
    """(b, N): local text i against global image j, likewise."""


def itc_logits(image_feats: torch.Tensor, text_feats: torch.Tensor, temperature: float | torch.Tensor,
               all_image_feats: torch.Tensor | None = None,
               all_text_feats: torch.Tensor | None = None) -> ItcLogits:
    """Similarities of BLIP-2's ITC. Features are L2-normalised here (normalising twice is harmless), and an
    image scores a text by its best-matching query: s(i, j) = max_q <img_iq, txt_j> / temperature."""
    if image_feats.dim() != 3 or text_feats.dim() != 2:
        raise ValueError(f"image_feats must be (b, Q, D) and text_feats (b, D); got {tuple(image_feats.shape)} "
                         f"and {tuple(text_feats.shape)}")
    all_image_feats = image_feats if all_image_feats is None else all_image_feats
    all_text_feats = text_feats if all_text_feats is None else all_text_feats
    image = F.normalize(image_feats, dim=-1)
    text = F.normalize(text_feats, dim=-1)
    all_image = F.normalize(all_image_feats, dim=-1)
    all_text = F.normalize(all_text_feats, dim=-1)
    i2t = torch.einsum("bqd,nd->bnq", image, all_text).amax(dim=-1)  # (b, N)
    t2i = torch.einsum("bd,nqd->bnq", text, all_image).amax(dim=-1)  # (b, N)
    return ItcLogits(i2t=i2t / temperature, t2i=t2i / temperature)


def positive_mask(num_local: int, num_global: int, rank: int = 0, image_ids: torch.Tensor | None = None,
                  all_image_ids: torch.Tensor | None = None, device: torch.device | None = None) -> torch.Tensor:
    """(b, N) bool: which global pairs count as a match for local row i.

    Without image ids only the pair itself (column rank * b + i); with them, every global pair whose image id
    equals row i's (the pair itself included).
    """
    if image_ids is None:
        columns = torch.arange(num_global, device=device)
        rows = torch.arange(num_local, device=device) + rank * num_local
        return rows[:, None] == columns[None, :]
    all_image_ids = image_ids if all_image_ids is None else all_image_ids
    if image_ids.shape != (num_local,) or all_image_ids.shape != (num_global,):
        raise ValueError(f"image_ids must be ({num_local},) and all_image_ids ({num_global},); got "
                         f"{tuple(image_ids.shape)} and {tuple(all_image_ids.shape)}")
    return image_ids.view(-1, 1) == all_image_ids.view(1, -1)


def itc_targets(num_local: int, num_global: int, rank: int = 0, image_ids: torch.Tensor | None = None,
                all_image_ids: torch.Tensor | None = None, device: torch.device | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(b, N) float target distribution p before label smoothing: the positives of `positive_mask`, each
    weighted 1 / (number of positives in the row), so every row sums to 1 (one-hot without image ids)."""
    positives = positive_mask(num_local, num_global, rank, image_ids, all_image_ids, device).to(dtype)
    return positives / positives.sum(dim=1, keepdim=True)


def itc_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, temperature: float | torch.Tensor,
             label_smoothing: float = 0.1, image_ids: torch.Tensor | None = None,
             all_image_feats: torch.Tensor | None = None, all_text_feats: torch.Tensor | None = None,
             rank: int = 0, all_image_ids: torch.Tensor | None = None) -> torch.Tensor:
    """BLIP-2's image-text contrastive loss, averaged over both directions.

    image_feats (b, Q, D) query embeddings after the vision projection; text_feats (b, D) the [CLS]
    embedding after the text projection; temperature a float or a (learnable) scalar tensor.

    With logits s = `itc_logits(...)` and p = `itc_targets(...)`, the target of local row i at global column
    j is  t_ij = (1 - eps) * p_ij + eps / N  (eps = label_smoothing), and

        loss_i2t = -(1/b) sum_i sum_j t_ij * log_softmax_j(s.i2t)_ij,   loss_t2i likewise with s.t2i,
        loss = (loss_i2t + loss_t2i) / 2.

    So without image ids this is cross-entropy with label smoothing against column rank * b + i; with image
    ids, texts of the same image are not pushed apart: all of them share the target mass equally (the
    LAVIS retrieval fine-tuning rule). In distributed use pass the gathered features (see the module
    docstring); `all_image_ids` defaults to `image_ids` (one process).
    """
    logits = itc_logits(image_feats, text_feats, temperature, all_image_feats, all_text_feats)
    i2t, t2i = _at_least_fp32(logits.i2t), _at_least_fp32(logits.t2i)
    num_local, num_global = i2t.shape
    targets = itc_targets(num_local, num_global, rank, image_ids, all_image_ids, device=i2t.device, dtype=i2t.dtype)
    # cross_entropy with probability targets applies label smoothing as (1 - eps) * p + eps / N.
    loss_i2t = F.cross_entropy(i2t, targets, label_smoothing=label_smoothing)
    loss_t2i = F.cross_entropy(t2i, targets, label_smoothing=label_smoothing)
    return (loss_i2t + loss_t2i) / 2


# ---------------------------------------------------------------- image-text matching (ITM)


@dataclass(slots=True)
class ItmNegatives:
    text_index: torch.Tensor
    """(b,) long: for local image i, the global index of the text drawn as its hard negative."""
    image_index: torch.Tensor
    """(b,) long: for local text i, the global index of the image drawn as its hard negative."""


@torch.no_grad()
def sample_itm_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, image_ids: torch.Tensor | None = None,
                         generator: torch.Generator | None = None, all_image_ids: torch.Tensor | None = None,
                         rank: int = 0) -> ItmNegatives:
    """Draw one hard negative text per local image and one hard negative image per local text.

    Row i draws global column j with probability softmax_j(sim)_ij over the columns that are not positives
    (`positive_mask`: the pair itself and, with image ids, every pair of the same image); positives have
    probability exactly 0. sim_* are ITC logits (b, N), already divided by the temperature.

    The draw is a Gumbel-max over noise for the whole (N, N) global matrix, of which this rank keeps its b
    rows: text negatives first, then image negatives. So processes sharing one generator seed draw exactly
    what a single process draws on the global batch, whatever the number of processes (pass a seeded
    `generator` for reproducible draws; None uses torch's global RNG).

    Raises ValueError when a row has no allowed column (every pair in the global batch is of its image).
    """
    num_local, num_global = sim_i2t.shape
    if sim_t2i.shape != sim_i2t.shape:
        raise ValueError(f"sim_i2t {tuple(sim_i2t.shape)} and sim_t2i {tuple(sim_t2i.shape)} must match")
    positives = positive_mask(num_local, num_global, rank, image_ids, all_image_ids, device=sim_i2t.device)
    has_negative = ~positives.all(dim=1)
    if not bool(has_negative.all()):
        row = int((~has_negative).nonzero()[0])
        raise ValueError(f"local row {row} has no negative: every pair in the global batch shares its image_id; "
                         "ITM needs at least two different images per global batch")
    rows = slice(rank * num_local, (rank + 1) * num_local)
    text_index = _gumbel_argmax(sim_i2t, positives, generator, num_global, rows)
    image_index = _gumbel_argmax(sim_t2i, positives, generator, num_global, rows)
    return ItmNegatives(text_index=text_index, image_index=image_index)


def _gumbel_argmax(sim: torch.Tensor, excluded: torch.Tensor, generator: torch.Generator | None,
                   num_global: int, rows: slice) -> torch.Tensor:
    # argmax_j(log p_j + g_j) with g ~ Gumbel(0, 1) is distributed as Categorical(p).
    log_p = torch.log_softmax(sim.float().masked_fill(excluded, float("-inf")), dim=1)
    device = generator.device if generator is not None else sim.device
    uniform = torch.rand((num_global, num_global), generator=generator, device=device)[rows].to(sim.device)
    gumbel = -torch.log(-torch.log(uniform.clamp_(min=torch.finfo(uniform.dtype).tiny)))
    return (log_p + gumbel).argmax(dim=1)


def itm_labels(num_local: int, device: torch.device | None = None) -> torch.Tensor:
    """(3b,) long: 1 for the b positive pairs, then 0 for the b (text, negative image) and the b
    (image, negative text) pairs, the row order `itm_loss` expects."""
    return torch.cat([torch.ones(num_local, dtype=torch.long, device=device),
                      torch.zeros(2 * num_local, dtype=torch.long, device=device)])


def itm_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the ITM head's (3b, 2) logits (already averaged over query outputs): rows [0, b)
    are the positive pairs (label 1), rows [b, 3b) the two kinds of hard-negative pairs (label 0)."""
    if logits.dim() != 2 or logits.shape[1] != 2 or logits.shape[0] % 3:
        raise ValueError(f"ITM logits must be (3b, 2); got {tuple(logits.shape)}")
    return F.cross_entropy(logits, itm_labels(logits.shape[0] // 3, device=logits.device))


# ---------------------------------------------------------------- image-grounded text generation (ITG)


def itg_attention_mask(num_query: int, text_attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, Q+T, Q+T) bool, True where row (query) may attend to column (key); sequence = [queries, text].

    Queries attend to every query and to no text (they must not see the caption they help generate); text
    position t attends to every query and to text positions <= t; padded text positions are never keys.
    Padded rows still see the queries, so no row is empty (its softmax stays finite).
    """
    batch_size, text_len = text_attention_mask.shape
    text_is_key = text_attention_mask.bool()  # (B, T)
    size = num_query + text_len
    mask = torch.zeros(batch_size, size, size, dtype=torch.bool, device=text_attention_mask.device)
    mask[:, :, :num_query] = True
    causal = torch.ones(text_len, text_len, dtype=torch.bool, device=mask.device).tril()
    mask[:, num_query:, num_query:] = causal[None] & text_is_key[:, None, :]
    return mask


def itg_labels(input_ids: torch.Tensor, pad_token_id: int,
               decoder_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoder_input_ids, labels), both (B, T), from right-padded tokenized captions.

    The first token (BERT's [CLS], the BOS of the encoder) becomes the decoder token ([DEC]), which tells the
    Q-Former's text branch to generate; labels are those ids with padding set to IGNORE_INDEX. Position 0 is
    never a target: `itg_loss` predicts token t + 1 from position t.
    """
    decoder_input_ids = input_ids.clone()
    decoder_input_ids[:, 0] = decoder_token_id
    labels = decoder_input_ids.masked_fill(input_ids == pad_token_id, IGNORE_INDEX)
    return decoder_input_ids, labels


def itg_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1,
             num_targets: float | torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy of the text positions: logits (B, T, V) at position t predict labels[:, t + 1];
    mean over the targets that are not IGNORE_INDEX, with label smoothing (BLIP-2 uses 0.1).

    num_targets: divide the sum of the token losses by this instead of the local count of targets. With
    several processes, pass (targets in the global batch) / (number of processes) (`count_targets`): the
    processes' losses then average (as DDP averages gradients) to the mean over every token of the global
    batch, which a per-process mean does not when captions differ in length."""
    return _next_token_loss(logits, labels, label_smoothing, num_targets)


# ---------------------------------------------------------------- stage 2: LM loss through the frozen LLM


def stage2_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, num_query: int,
                  prompt_lengths: int | torch.Tensor | None = None) -> torch.Tensor:
    """(B, Q+T) labels for the LLM input [projected queries (Q), text (T)].

    Query positions, padding (attention_mask == 0, left or right) and the first prompt_lengths[b] real tokens
    of each text are IGNORE_INDEX; the rest are the text's ids. prompt_lengths counts tokens as the tokenizer
    made them, special tokens included (OPT's leading "</s>" is one), as an int for all rows or a (B,) tensor.
    """
    real = attention_mask.bool()
    labels = input_ids.masked_fill(~real, IGNORE_INDEX)
    if prompt_lengths is not None:
        prompt_lengths = torch.as_tensor(prompt_lengths, device=input_ids.device).view(-1, 1)
        position_among_real = real.long().cumsum(dim=1)  # 1 at the first real token
        labels = labels.masked_fill(real & (position_among_real <= prompt_lengths), IGNORE_INDEX)
    query_labels = labels.new_full((labels.shape[0], num_query), IGNORE_INDEX)
    return torch.cat([query_labels, labels], dim=1)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
            num_targets: float | torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, L, V) at position t predict labels[:, t + 1]; mean over the
    targets that are not IGNORE_INDEX (as transformers' causal LMs compute their loss). num_targets: as in
    `itg_loss`."""
    return _next_token_loss(logits, labels, label_smoothing, num_targets)


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    """Scalar long: the next-token targets in `labels` (positions 1.. that are not IGNORE_INDEX)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def _next_token_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float,
                     num_targets: float | torch.Tensor | None = None) -> torch.Tensor:
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, L)")
    predicted = _at_least_fp32(logits[:, :-1].reshape(-1, logits.shape[-1]))
    targets = labels[:, 1:].reshape(-1)
    if num_targets is None:
        return F.cross_entropy(predicted, targets, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)
    total = F.cross_entropy(predicted, targets, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing,
                            reduction="sum")
    return total / num_targets


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    # bf16/fp16 logits (autocast) go through log-softmax in fp32; fp64 stays fp64 (tests).
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits

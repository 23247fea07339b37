"""The stage-1/stage-2 losses on hand-sized tensors, against the formulas written out here element by element
(plain Python loops over floats), never by calling the code under test twice."""
import math

import pytest
import torch

from fovea.training.losses import (IGNORE_INDEX, count_targets, itc_logits, itc_loss, itg_attention_mask,
                                   itg_labels, itg_loss, itm_loss, lm_loss, sample_itm_negatives, stage2_labels)


def features(batch=3, num_query=2, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, num_query, dim, generator=g, dtype=torch.float64),
            torch.randn(batch, dim, generator=g, dtype=torch.float64))


def unit(v):
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def expected_itc(image, text, temperature, eps, image_ids=None):
    """loss = 1/2 (i2t + t2i), each -1/B sum_i sum_j t_ij log softmax_j(s)_ij, t_ij = (1-eps) p_ij + eps/B."""
    batch, num_query = image.shape[0], image.shape[1]
    img = [[unit(image[i, q].tolist()) for q in range(num_query)] for i in range(batch)]
    txt = [unit(text[j].tolist()) for j in range(batch)]

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    s_i2t = [[max(dot(img[i][q], txt[j]) for q in range(num_query)) / temperature for j in range(batch)]
             for i in range(batch)]
    s_t2i = [[max(dot(txt[i], img[j][q]) for q in range(num_query)) / temperature for j in range(batch)]
             for i in range(batch)]
    if image_ids is None:
        p = [[1.0 if i == j else 0.0 for j in range(batch)] for i in range(batch)]
    else:
        p = [[(1.0 if image_ids[i] == image_ids[j] else 0.0) / image_ids.count(image_ids[i]) for j in range(batch)]
             for i in range(batch)]

    def direction(s):
        total = 0.0
        for i in range(batch):
            log_z = math.log(sum(math.exp(x) for x in s[i]))
            total -= sum(((1 - eps) * p[i][j] + eps / batch) * (s[i][j] - log_z) for j in range(batch))
        return total / batch

    return (direction(s_i2t) + direction(s_t2i)) / 2


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_itc_matches_the_formula(eps):
    image, text = features(batch=3)
    got = itc_loss(image, text, 0.07, label_smoothing=eps)
    assert got.item() == pytest.approx(expected_itc(image, text, 0.07, eps), rel=1e-12)


def test_itc_features_are_normalised_and_the_best_query_counts():
    image, text = features(batch=3)
    scaled = itc_loss(image * 5.0, text * 0.2, 0.5)
    assert scaled.item() == pytest.approx(itc_loss(image, text, 0.5).item(), rel=1e-12)
    logits = itc_logits(image, text, 1.0)
    i, j = 1, 2
    cos = [unit(image[i, q].tolist()) for q in range(2)]
    t = unit(text[j].tolist())
    assert logits.i2t[i, j].item() == pytest.approx(max(sum(a * b for a, b in zip(c, t)) for c in cos))
    assert torch.allclose(logits.t2i, logits.i2t.T)  # one process: the same pairs seen from the other side


def test_itc_with_image_ids_shares_the_target_between_captions_of_one_image():
    image, text = features(batch=4, seed=1)
    ids = [7, 3, 7, 5]
    got = itc_loss(image, text, 0.1, label_smoothing=0.1, image_ids=torch.tensor(ids))
    assert got.item() == pytest.approx(expected_itc(image, text, 0.1, 0.1, image_ids=ids), rel=1e-12)
    # all ids distinct is the same as no ids
    distinct = itc_loss(image, text, 0.1, image_ids=torch.tensor([4, 3, 2, 1]))
    assert distinct.item() == pytest.approx(itc_loss(image, text, 0.1).item(), rel=1e-12)


def test_itc_split_over_ranks_sums_to_the_global_loss_and_gradients():
    """Two simulated ranks (local halves against the full batch, rank offsets) average to the one-process
    loss, and so do their gradients (what all_gather_with_grad + DDP's mean do for real processes)."""
    image, text = features(batch=4, seed=2)
    ids = torch.tensor([1, 2, 1, 3])
    image.requires_grad_(True)
    text.requires_grad_(True)
    whole = itc_loss(image, text, 0.2, image_ids=ids)
    grads_whole = torch.autograd.grad(whole, (image, text))
    halves = [itc_loss(image[r * 2:(r + 1) * 2], text[r * 2:(r + 1) * 2], 0.2, image_ids=ids[r * 2:(r + 1) * 2],
                       all_image_feats=image, all_text_feats=text, all_image_ids=ids, rank=r) for r in range(2)]
    mean = (halves[0] + halves[1]) / 2
    assert mean.item() == pytest.approx(whole.item(), rel=1e-12)
    for a, b in zip(torch.autograd.grad(mean, (image, text)), grads_whole):
        assert torch.allclose(a, b, atol=1e-12)


def test_itc_learnable_temperature_gets_a_gradient():
    image, text = features(batch=3)
    temp = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    itc_loss(image, text, temp).backward()
    assert temp.grad is not None and temp.grad.abs() > 0


# ---------------------------------------------------------------- ITM


def masked_softmax_rows(sim, allowed):
    rows = []
    for i in range(len(sim)):
        weights = [math.exp(sim[i][j]) if allowed[i][j] else 0.0 for j in range(len(sim[i]))]
        total = sum(weights)
        rows.append([w / total for w in weights])
    return rows


def test_itm_negatives_follow_the_masked_softmax_and_never_hit_positives():
    g = torch.Generator().manual_seed(0)
    sim_i2t = torch.randn(4, 4, generator=g)
    sim_t2i = torch.randn(4, 4, generator=g)
    ids = [1, 2, 1, 3]
    allowed = [[ids[i] != ids[j] for j in range(4)] for i in range(4)]  # same image (and the pair itself) banned
    # Many draws in few calls: a global batch of `copies` copies of the 4 pairs. Row (k, i) sees every copy of
    # column j with the same score, so the copies of j together carry exactly probability p_ij.
    copies, calls = 250, 20
    ids_big = torch.tensor(ids * copies)
    counts_text = torch.zeros(4, 4)
    counts_image = torch.zeros(4, 4)
    generator = torch.Generator().manual_seed(123)
    for _ in range(calls):
        neg = sample_itm_negatives(sim_i2t.repeat(copies, copies), sim_t2i.repeat(copies, copies), ids_big,
                                   generator=generator)
        rows = torch.arange(4 * copies) % 4
        counts_text.index_put_((rows, neg.text_index % 4), torch.ones(4 * copies), accumulate=True)
        counts_image.index_put_((rows, neg.image_index % 4), torch.ones(4 * copies), accumulate=True)
    draws = copies * calls
    for counts, sim in ((counts_text, sim_i2t), (counts_image, sim_t2i)):
        expected = masked_softmax_rows(sim.tolist(), allowed)
        for i in range(4):
            for j in range(4):
                if not allowed[i][j]:
                    assert counts[i, j] == 0, (i, j)
                else:
                    assert counts[i, j].item() / draws == pytest.approx(expected[i][j], abs=0.03), (i, j)


def test_itm_without_ids_masks_the_pair_itself_at_the_rank_offset():
    sim = torch.zeros(2, 4)  # rank 1 of 2, local batch 2: its pairs are global columns 2 and 3
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(60):
        neg = sample_itm_negatives(sim, sim, None, generator=generator, rank=1)
        for i in range(2):
            assert neg.text_index[i].item() != 2 + i and neg.image_index[i].item() != 2 + i
            seen.add((i, neg.text_index[i].item()))
    assert seen == {(0, 0), (0, 1), (0, 3), (1, 0), (1, 1), (1, 2)}  # the rest are all reachable


def test_itm_draws_do_not_depend_on_the_number_of_processes():
    g = torch.Generator().manual_seed(5)
    sim_i2t, sim_t2i = torch.randn(6, 6, generator=g), torch.randn(6, 6, generator=g)
    ids = torch.tensor([0, 1, 0, 2, 3, 1])
    whole = sample_itm_negatives(sim_i2t, sim_t2i, ids, generator=torch.Generator().manual_seed(9))
    for world_size in (2, 3):
        b = 6 // world_size
        parts = [sample_itm_negatives(sim_i2t[r * b:(r + 1) * b], sim_t2i[r * b:(r + 1) * b], ids[r * b:(r + 1) * b],
                                      generator=torch.Generator().manual_seed(9), all_image_ids=ids, rank=r)
                 for r in range(world_size)]
        assert torch.equal(torch.cat([p.text_index for p in parts]), whole.text_index)
        assert torch.equal(torch.cat([p.image_index for p in parts]), whole.image_index)


def test_itm_raises_when_a_row_has_no_negative():
    sim = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="no negative"):
        sample_itm_negatives(sim, sim, torch.tensor([4, 4]))


def test_itm_loss_matches_the_formula():
    logits = torch.tensor([[0.1, 2.0], [1.0, -1.0], [0.3, 0.2], [0.5, 0.5], [2.0, 1.0], [-1.0, 0.0]],
                          dtype=torch.float64)
    labels = [1, 1, 0, 0, 0, 0]
    expected = -sum(row[y] - math.log(math.exp(row[0]) + math.exp(row[1]))
                    for row, y in zip(logits.tolist(), labels)) / 6
    assert itm_loss(logits).item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError):
        itm_loss(logits[:5])


# ---------------------------------------------------------------- ITG


def test_itg_attention_mask_pattern():
    text_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    got = itg_attention_mask(2, text_mask)
    #              q0 q1 t0 t1 t2
    expected_full = [[1, 1, 0, 0, 0],  # q0: queries only
                     [1, 1, 0, 0, 0],  # q1
                     [1, 1, 1, 0, 0],  # t0: all queries + itself
                     [1, 1, 1, 1, 0],  # t1
                     [1, 1, 1, 1, 1]]  # t2
    expected_padded = [[1, 1, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [1, 1, 1, 0, 0],
                       [1, 1, 1, 1, 0],
                       [1, 1, 1, 1, 0]]  # t2 is padding: never a key; its own row still sees queries and text
    assert got.dtype == torch.bool and got.shape == (2, 5, 5)
    assert got[0].int().tolist() == expected_full
    assert got[1].int().tolist() == expected_padded


def test_itg_labels_replace_the_first_token_and_ignore_padding():
    input_ids = torch.tensor([[101, 5, 6, 102, 0], [101, 7, 102, 0, 0]])
    decoder_input_ids, labels = itg_labels(input_ids, pad_token_id=0, decoder_token_id=30522)
    assert decoder_input_ids.tolist() == [[30522, 5, 6, 102, 0], [30522, 7, 102, 0, 0]]
    assert labels.tolist() == [[30522, 5, 6, 102, -100], [30522, 7, 102, -100, -100]]
    assert input_ids[0, 0] == 101  # the input is not modified


def token_loss_by_hand(logits, labels, eps):
    """mean over t with labels[b][t+1] != -100 of -((1-eps) log p_y + eps/V sum_v log p_v) at position t."""
    total, count = 0.0, 0
    for b in range(len(labels)):
        for t in range(len(labels[b]) - 1):
            y = labels[b][t + 1]
            if y == IGNORE_INDEX:
                continue
            row = logits[b][t]
            log_z = math.log(sum(math.exp(x) for x in row))
            log_p = [x - log_z for x in row]
            total -= (1 - eps) * log_p[y] + eps / len(row) * sum(log_p)
            count += 1
    return total / count


def test_itg_loss_shifts_and_smooths():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    labels = torch.tensor([[6, 1, 2, 3, -100], [6, 4, 5, -100, -100]])
    expected = token_loss_by_hand(logits.tolist(), labels.tolist(), 0.1)
    assert itg_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- stage 2


def test_stage2_labels_mask_queries_prompt_and_padding():
    input_ids = torch.tensor([[2, 10, 11, 12, 1], [2, 13, 1, 1, 1]])  # OPT: 2 = "</s>" BOS, 1 = pad
    attention_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    q = [-100, -100, -100]
    assert stage2_labels(input_ids, attention_mask, num_query=3).tolist() == [
        q + [2, 10, 11, 12, -100], q + [2, 13, -100, -100, -100]]
    assert stage2_labels(input_ids, attention_mask, num_query=3, prompt_lengths=1).tolist() == [
        q + [-100, 10, 11, 12, -100], q + [-100, 13, -100, -100, -100]]
    assert stage2_labels(input_ids, attention_mask, num_query=3, prompt_lengths=torch.tensor([3, 1])).tolist() == [
        q + [-100, -100, -100, 12, -100], q + [-100, 13, -100, -100, -100]]
    # left padding: the prompt is counted from the first real token
    left = stage2_labels(torch.tensor([[1, 2, 13, 14]]), torch.tensor([[0, 1, 1, 1]]), num_query=1, prompt_lengths=1)
    assert left.tolist() == [[-100, -100, -100, 13, 14]]


def test_lm_loss_is_plain_shifted_cross_entropy():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 6, 9, generator=g, dtype=torch.float64)
    labels = stage2_labels(torch.tensor([[2, 3, 4], [2, 5, 1]]), torch.tensor([[1, 1, 1], [1, 1, 0]]),
                           num_query=3, prompt_lengths=1)
    expected = token_loss_by_hand(logits.tolist(), labels.tolist(), 0.0)
    assert lm_loss(logits, labels).item() == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError):
        lm_loss(logits, labels[:, 1:])


def test_token_losses_split_over_processes_average_to_the_global_token_mean():
    """Two 'processes' with captions of different lengths: per-process means average to the wrong value;
    dividing each process's sum by (global targets / processes) averages to the global mean."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 5, 7, generator=g, dtype=torch.float64)
    labels = torch.tensor([[6, 1, 2, 3, 4], [6, 4, 5, -100, -100], [6, 2, -100, -100, -100], [6, 5, -100, -100, -100]])
    whole = itg_loss(logits, labels)
    assert count_targets(labels).item() == 4 + 2 + 1 + 1
    halves = [(logits[:2], labels[:2]), (logits[2:], labels[2:])]
    per_process_means = sum(itg_loss(lg, lb) for lg, lb in halves) / 2
    assert abs(per_process_means.item() - whole.item()) > 1e-3
    divisor = count_targets(labels).item() / 2
    averaged = sum(itg_loss(lg, lb, num_targets=divisor) for lg, lb in halves) / 2
    assert averaged.item() == pytest.approx(whole.item(), rel=1e-12)
    by_hand = token_loss_by_hand(logits[:2].tolist(), labels[:2].tolist(), 0.1) * 6 / divisor
    assert itg_loss(logits[:2], labels[:2], num_targets=divisor).item() == pytest.approx(by_hand, rel=1e-9)
    assert lm_loss(logits, labels, num_targets=count_targets(labels)).item() == pytest.approx(
        lm_loss(logits, labels).item(), rel=1e-12)

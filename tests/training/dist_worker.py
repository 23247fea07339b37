"""Two SGD steps of ITC + ITM + a gathered quadratic loss on a toy two-tower model, used by test_distributed.py.

Run twice on the same global batches: under `torchrun --nproc_per_node=2` (gloo, DDP, each rank its half) and
in-process as one plain process (no process group). Rank 0 / the single process writes parameters, first-step
gradients and losses to a safetensors file.

Modes: "plain" (no image ids), "ids" (duplicate image ids, some shared across ranks), and "detached" (like
"ids" but gathering features *without* gradients) which must NOT match: it shows the check has teeth.
"""
from __future__ import annotations

import faulthandler
import os
import sys

import torch
from safetensors.torch import save_file
from torch import nn

from fovea.training.distributed import (all_gather_with_grad, cleanup, concat_all_gather, init_distributed)
from fovea.training.losses import itc_logits, itc_loss, itm_loss, sample_itm_negatives

GLOBAL_BATCH, NUM_QUERY, IN_DIM, DIM, NUM_STEPS = 8, 2, 6, 4, 2
GLOBAL_IMAGE_IDS = torch.tensor([0, 1, 0, 2, 3, 1, 4, 5])  # 0 twice on rank 0, 1 on both ranks
MODES = ("plain", "ids", "detached")


class TwoTowers(nn.Module):
    def __init__(self):
        super().__init__()
        self.image_proj = nn.Linear(IN_DIM, NUM_QUERY * DIM)
        self.text_proj = nn.Linear(IN_DIM, DIM)
        self.itm_head = nn.Linear(DIM, 2)
        self.temp = nn.Parameter(torch.tensor([0.1]))

    def forward(self, images, texts, image_ids, rank, generator, mode):
        image_feats = self.image_proj(images).view(-1, NUM_QUERY, DIM)  # (b, Q, D)
        text_feats = self.text_proj(texts)  # (b, D)
        gather = concat_all_gather if mode == "detached" else all_gather_with_grad
        all_image_feats, all_text_feats = gather(image_feats), gather(text_feats)  # (N, Q, D), (N, D)
        ids = None if mode == "plain" else image_ids
        all_ids = None if ids is None else concat_all_gather(ids)
        itc = itc_loss(image_feats, text_feats, self.temp, image_ids=ids, all_image_feats=all_image_feats,
                       all_text_feats=all_text_feats, rank=rank, all_image_ids=all_ids)
        logits = itc_logits(image_feats.detach(), text_feats.detach(), self.temp.detach(),
                            all_image_feats.detach(), all_text_feats.detach())
        negatives = sample_itm_negatives(logits.i2t, logits.t2i, ids, generator=generator, all_image_ids=all_ids,
                                         rank=rank)
        pooled, all_pooled = image_feats.mean(dim=1), all_image_feats.mean(dim=1)  # (b, D), (N, D)
        pairs = torch.cat([pooled * text_feats,  # positives
                           all_pooled[negatives.image_index] * text_feats,  # text with a hard negative image
                           pooled * all_text_feats[negatives.text_index]])  # image with a hard negative text
        itm = itm_loss(self.itm_head(pairs))
        quadratic = (image_feats.flatten(1) @ all_image_feats.flatten(1).T).square().mean()
        return itc + itm + 0.1 * quadratic


def global_batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return (torch.randn(GLOBAL_BATCH, IN_DIM, generator=g, dtype=torch.float64),
            torch.randn(GLOBAL_BATCH, IN_DIM, generator=g, dtype=torch.float64))


def run(out_path: str) -> None:
    state = init_distributed()
    rank, world_size = state.rank, state.world_size
    local = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    results = {}
    for mode in MODES:
        torch.manual_seed(0)
        model = TwoTowers().double()  # float64: differences are then the math's, not float32 rounding's
        wrapped = model if world_size == 1 else nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        for step in range(NUM_STEPS):
            images, texts = global_batch(step)
            generator = torch.Generator().manual_seed(7 + step)  # the same on every rank: same ITM draws
            loss = wrapped(images[local], texts[local], GLOBAL_IMAGE_IDS[local], rank, generator, mode)
            optimizer.zero_grad()
            loss.backward()
            if step == 0:
                for name, param in model.named_parameters():
                    results[f"{mode}/grad0/{name}"] = param.grad.detach().clone()
            optimizer.step()
            mean_loss = concat_all_gather(loss.detach().view(1)).mean()  # every rank's local loss, averaged
            results[f"{mode}/loss{step}"] = mean_loss
        for name, param in model.named_parameters():
            results[f"{mode}/param/{name}"] = param.detach().clone()
        del wrapped, model, optimizer  # DDP holds the process group; see cleanup()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in results.items()}, out_path)
    cleanup()


if __name__ == "__main__":
    faulthandler.enable(all_threads=True)  # a crash in a collective or at teardown shows where each thread was
    torch.set_num_threads(1)
    run(sys.argv[1])
    if os.environ.get("LOCAL_RANK") == "0":
        print("dist_worker: done")
    # All work is done and the process group destroyed. About 1 run in 50 under load, a rank still aborted
    # ("terminate called without an active exception", no Python frame) while the interpreter and torch's C++
    # statics were being torn down; leaving without that teardown keeps the test about the math.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

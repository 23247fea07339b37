import math

import pytest
import torch
from torch import nn

from fovea.training.optim import WarmupCosine, build_optimizer, build_scheduler, split_decay_parameters


class RMSNorm(nn.Module):  # a model's own norm class, known only by its name
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.scale2d = nn.Parameter(torch.ones(1, dim))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.query_tokens = nn.Parameter(torch.zeros(1, 3, 4))
        self.embeddings = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.rms = RMSNorm(4)
        self.frozen = nn.Linear(4, 4)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.position_embedding = nn.Parameter(torch.zeros(1, 5, 4))
        for p in self.frozen.parameters():
            p.requires_grad = False


def test_no_decay_for_biases_norms_embeddings_and_query_tokens():
    decay, no_decay = split_decay_parameters(Toy())
    assert decay == ["proj.weight"]
    assert no_decay == ["query_tokens", "temp", "position_embedding", "embeddings.weight", "proj.bias", "norm.weight",
                        "norm.bias", "rms.weight", "rms.scale2d"]  # named_parameters order: own, then children


def test_optimizer_groups_carry_their_weight_decay():
    model = Toy()
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    groups = [(g["weight_decay"], g["param_names"], len(g["params"])) for g in optimizer.param_groups]
    assert groups[0] == (0.05, ["proj.weight"], 1)
    assert groups[1][0] == 0.0 and len(groups[1][1]) == groups[1][2] == 9
    # decoupled decay acts on proj.weight only: with zero gradients Adam's update is 0, decay is what is left
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    for name, param in model.named_parameters():
        factor = 1 - 1e-3 * 0.05 if name == "proj.weight" else 1.0
        assert torch.allclose(param, before[name] * factor, rtol=0, atol=1e-9), name


def expected_multiplier(step, warmup, total, floor):
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / (total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def test_schedule_is_linear_warmup_then_cosine():
    base_lr, warmup, total, floor = 0.1, 4, 12, 0.1
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=base_lr)
    scheduler = build_scheduler(optimizer, warmup_steps=warmup, total_steps=total, min_lr_ratio=floor)
    seen = []
    for step in range(16):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    for step, lr in enumerate(seen):
        assert lr == pytest.approx(base_lr * expected_multiplier(step, warmup, total, floor), rel=1e-12), step
    assert seen[0] == pytest.approx(0.025) and seen[3] == pytest.approx(0.1) and seen[4] == pytest.approx(0.1)
    assert seen[8] == pytest.approx(0.1 * (0.1 + 0.9 * 0.5))  # half-way through the cosine
    assert seen[12] == pytest.approx(0.01) and seen[15] == pytest.approx(0.01)  # floor from total_steps on


def test_schedule_without_warmup_and_bad_arguments():
    schedule = WarmupCosine(0, 10)
    assert schedule(0) == 1.0 and schedule(10) == pytest.approx(0.0) and schedule(5) == pytest.approx(0.5)
    for args in [(-1, 10), (5, 4), (0, 0)]:
        with pytest.raises(ValueError):
            WarmupCosine(*args)
    with pytest.raises(ValueError):
        WarmupCosine(1, 10, min_lr_ratio=1.5)


def train(model, optimizer, scheduler, steps, start=0):
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(step)
        loss = model(torch.randn(3, 4, generator=g)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def test_optimizer_and_schedule_resume_bit_for_bit():
    def fresh():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1)
        return model, optimizer, build_scheduler(optimizer, warmup_steps=2, total_steps=8, min_lr_ratio=0.1)

    straight = fresh()
    train(*straight, steps=6)

    first = fresh()
    train(*first, steps=3)
    saved = {"model": first[0].state_dict(), "optimizer": first[1].state_dict(), "scheduler": first[2].state_dict()}
    resumed = fresh()
    resumed[0].load_state_dict(saved["model"])
    resumed[1].load_state_dict(saved["optimizer"])
    resumed[2].load_state_dict(saved["scheduler"])
    train(*resumed, steps=3, start=3)

    for a, b in zip(straight[0].parameters(), resumed[0].parameters()):
        assert torch.equal(a, b)
    assert straight[1].param_groups[0]["lr"] == resumed[1].param_groups[0]["lr"]
    assert resumed[2].lr_lambdas[0].__dict__ == {"warmup_steps": 2, "total_steps": 8, "min_lr_ratio": 0.1}

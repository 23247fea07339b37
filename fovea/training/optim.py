"""AdamW with decoupled weight decay on matrices only, and a linear warm-up + cosine decay schedule.

Both are plain torch objects (`torch.optim.AdamW`, `torch.optim.lr_scheduler.LambdaLR`), so a checkpoint is
their `state_dict()`s; the schedule is a callable object whose whole state is its three numbers, which
LambdaLR saves and restores with it.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

NO_DECAY_NAMES = ("query_tokens", "position_embedding", "class_embedding", "pos_embed", "cls_token")
"""Parameter names (one dot-separated component) kept free of weight decay even though they are matrices:
learned tokens and positional tables, which decay would pull towards zero for no regularising gain."""


def _is_norm_or_embedding(module: nn.Module) -> bool:
    # By type name as well, so fovea's own RMSNorm/LayerNorm classes count without being listed here.
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or "norm" in type(module).__name__.lower()


def split_decay_parameters(model: nn.Module,
                           no_decay_names: Iterable[str] = NO_DECAY_NAMES) -> tuple[list[str], list[str]]:
    """(decay, no_decay) names of the trainable parameters (requires_grad), in `named_parameters` order.

    No weight decay for: biases and every parameter with fewer than 2 dimensions (norm scales, a learnable
    temperature), every parameter of a norm or embedding module, and names with a component in
    `no_decay_names` (the Q-Former's query tokens, positional embeddings). Everything else decays.
    """
    no_decay_names = set(no_decay_names)
    exempt = set()
    for module_name, module in model.named_modules():
        if _is_norm_or_embedding(module):
            exempt.update(f"{module_name}.{n}" if module_name else n for n, _ in module.named_parameters(recurse=False))
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        parts = name.split(".")
        if param.ndim < 2 or parts[-1] == "bias" or name in exempt or no_decay_names.intersection(parts):
            no_decay.append(name)
        else:
            decay.append(name)
    return decay, no_decay


def build_param_groups(model: nn.Module, weight_decay: float,
                       no_decay_names: Iterable[str] = NO_DECAY_NAMES) -> list[dict]:
    """Two AdamW parameter groups, [decaying, not decaying], each with "param_names" for inspection and
    checkpoints; a group with no parameters is left out."""
    decay, no_decay = split_decay_parameters(model, no_decay_names)
    params = dict(model.named_parameters())
    groups = []
    for names, group_decay in ((decay, weight_decay), (no_decay, 0.0)):
        if names:
            groups.append({"params": [params[n] for n in names], "param_names": names,
                           "weight_decay": group_decay})
    return groups


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    no_decay_names: Iterable[str] = NO_DECAY_NAMES) -> torch.optim.AdamW:
    """AdamW over `build_param_groups` (BLIP-2's stage-1 recipe: lr 1e-4, weight decay 0.05)."""
    groups = build_param_groups(model, weight_decay, no_decay_names)
    if not groups:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


class WarmupCosine:
    """LR multiplier at optimizer step `step` (0-based: the multiplier used by the (step+1)-th update):

        step < W:       (step + 1) / W                                  linear warm-up, reaching 1 at W - 1
        step >= W:      m + (1 - m) * (1 + cos(pi * p)) / 2,   p = min(1, (step - W) / max(1, S - W))

    with W = warmup_steps, S = total_steps, m = min_lr_ratio: 1 at step W, m from step S on.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
        if warmup_steps < 0 or total_steps < max(1, warmup_steps):
            raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}), "
                             "and total_steps >= 1")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={min_lr_ratio} must be in [0, 1]")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR with `WarmupCosine`; call `step()` once after every optimizer step. Every group's lr is its
    base lr times the multiplier."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_lr_ratio))

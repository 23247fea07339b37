"""The training loop shared by both stages: data -> prepare -> loss -> backward -> step -> log -> checkpoint.

The same code runs as one plain process (no process group) or under torchrun (gloo/nccl, DDP, each process
its share of every global batch through `ResumableDistributedSampler`). Everything that decides the numbers is
seeded or saved, so a run stopped and resumed from a checkpoint continues bit for bit:

- model init: `seed`; dropout: torch's RNG, seeded per process and saved in checkpoints;
- data order: the sampler's (seed, epoch), and the position (epoch, samples consumed) saved in checkpoints;
  the DataLoader gets its own generator so creating an iterator never draws from torch's global RNG;
- ITM hard negatives: a generator seeded from (seed, step, micro-batch), the same in every process, so N
  processes draw what one process draws on the global batch.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from fovea.training.build import StageSetup, build_setup, open_dataset
from fovea.training.checkpoint import (TrainingPosition, checkpoint_dir, list_checkpoints, load_checkpoint,
                                       save_checkpoint)
from fovea.training.config import TrainConfig
from fovea.training.data import PairCollator, ResumableDistributedSampler
from fovea.training.distributed import barrier, cleanup, init_distributed
from fovea.training.optim import build_optimizer, build_scheduler
from fovea.training.plots import plot_metrics, read_metrics

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "loss_curves.png"
EXPORT_DIR = "export"


@dataclass(slots=True)
class TrainResult:
    output_dir: Path
    step: int
    """Optimizer steps done when this run ended."""
    last_metrics: dict
    checkpoint: Path | None
    """The newest checkpoint written by this run."""
    export_dir: Path | None
    """The Hugging Face checkpoint, when the run reached max_steps and export is on."""


def itm_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The generator of ITM's negative draws for one micro-batch: a function of (seed, step, micro) only."""
    state = np.random.SeedSequence([seed, step, micro]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def resolve_resume(config: TrainConfig) -> Path | None:
    if config.resume is None:
        return None
    if config.resume == "latest":
        found = list_checkpoints(config.output_dir)
        return found[-1] if found else None
    path = Path(config.resume)
    if not (path / "state.json").is_file():
        raise ValueError(f"resume={config.resume!r} is not a checkpoint folder (no state.json)")
    return path


def _truncate_metrics(path: Path, step: int) -> None:
    rows = [row for row in read_metrics(path) if row["step"] <= step]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _mean_over_processes(values: dict[str, torch.Tensor], world_size: int) -> dict[str, float]:
    names = sorted(values)
    stacked = torch.stack([values[n].detach().float().reshape(()) for n in names])
    if world_size > 1:
        dist.all_reduce(stacked)
        stacked /= world_size
    return dict(zip(names, stacked.tolist()))


class _Batches:
    """Endless batches from the sampler's current position, moving to the next epoch when one ends, and
    keeping the position (epoch, samples consumed) for checkpoints."""

    def __init__(self, loader: DataLoader, sampler: ResumableDistributedSampler, batch_size: int,
                 position: TrainingPosition):
        self.loader, self.sampler, self.batch_size = loader, sampler, batch_size
        self.epoch, self.offset = position.epoch, position.offset
        sampler.set_position(self.epoch, self.offset)
        self._iterator = iter(loader)

    def next(self):
        for _ in range(2):
            try:
                batch = next(self._iterator)
                self.offset += self.batch_size
                return batch
            except StopIteration:
                self.epoch, self.offset = self.epoch + 1, 0
                self.sampler.set_epoch(self.epoch)
                self._iterator = iter(self.loader)
        raise ValueError("the dataset has fewer pairs per process than one batch")


def train(config: TrainConfig, setup: StageSetup | None = None) -> TrainResult:
    """Run (or continue) the training `config` describes; see the module docstring. `setup` may be given
    pre-built (tests); by default it is built from the config."""
    state = init_distributed()
    rank, world_size = state.rank, state.world_size
    is_main = rank == 0
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    output_dir = Path(config.output_dir)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
    setup = setup if setup is not None else build_setup(config)
    model = setup.model.to(state.device)

    dataset = open_dataset(config.train_data, config.image_root)
    sampler = ResumableDistributedSampler(dataset, shuffle=config.shuffle, seed=config.seed)
    if len(sampler) < config.batch_size:
        raise ValueError(f"{len(dataset)} pairs over {world_size} process(es) is fewer than one batch of "
                         f"{config.batch_size} per process")
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler,
                        collate_fn=PairCollator(setup.image_transform), num_workers=config.num_workers,
                        drop_last=True, generator=torch.Generator().manual_seed(config.seed))
    optimizer = build_optimizer(model, lr=config.lr, weight_decay=config.weight_decay, eps=config.adam_eps)
    scheduler = build_scheduler(optimizer, config.warmup_steps, config.max_steps, config.min_lr_ratio)
    torch.manual_seed(config.seed * 1000 + 1 + rank)  # dropout: a stream per process

    position = TrainingPosition(step=0, epoch=0, offset=0)
    metrics_path = output_dir / METRICS_FILE
    resume_dir = resolve_resume(config)
    if resume_dir is not None:
        position = load_checkpoint(resume_dir, model, optimizer, scheduler, rank, world_size)
        if is_main:
            _truncate_metrics(metrics_path, position.step)
    elif is_main and metrics_path.exists():
        metrics_path.unlink()  # a fresh run in an old folder starts a fresh log
    barrier()

    wrapped: nn.Module = model if world_size == 1 else nn.parallel.DistributedDataParallel(model)
    model.train()
    batches = _Batches(loader, sampler, config.batch_size, position)
    trainable = [p for p in model.parameters() if p.requires_grad]
    autocast = torch.autocast(device_type=state.device.type, dtype=torch.bfloat16, enabled=config.bf16)
    global_batch = config.batch_size * world_size * config.grad_accum_steps
    bar = tqdm(total=config.max_steps, initial=position.step, disable=not (is_main and config.progress),
               desc=config.stage, dynamic_ncols=True)
    step, last_metrics, last_checkpoint = position.step, {}, None
    started = time.perf_counter()
    while step < config.max_steps:
        step_start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        for micro in range(config.grad_accum_steps):
            batch = setup.prepare(batches.next())
            is_last = micro == config.grad_accum_steps - 1
            sync = contextlib.nullcontext() if is_last or world_size == 1 else wrapped.no_sync()
            with sync:
                with autocast:
                    parts = setup.loss(wrapped, batch, itm_generator(config.seed, step, micro))
                (parts["loss"] / config.grad_accum_steps).backward()
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() / config.grad_accum_steps
        if config.max_grad_norm is not None:
            sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        step += 1

        values = _mean_over_processes(sums, world_size)
        seconds = time.perf_counter() - step_start
        last_metrics = {"step": step, "epoch": batches.epoch, "lr": lr, **values,
                        "samples_per_s": global_batch / seconds, "elapsed_s": time.perf_counter() - started}
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(f"loss is {values['loss']} at step {step}")
        if is_main and (step % config.log_every == 0 or step == config.max_steps):
            with metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(last_metrics) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{values['loss']:.4f}", samples_s=f"{global_batch / seconds:.1f}")

        stop_now = config.stop_at_step is not None and step >= config.stop_at_step
        if step % config.save_every == 0 or step == config.max_steps or stop_now:
            last_checkpoint = checkpoint_dir(output_dir, step)
            save_checkpoint(last_checkpoint, model, optimizer, scheduler,
                            TrainingPosition(step=step, epoch=batches.epoch, offset=batches.offset),
                            config.to_dict(), rank, world_size, barrier)
            if is_main:
                _prune_checkpoints(output_dir, config.keep_checkpoints)
                plot_metrics(metrics_path, output_dir / CURVES_FILE)
        if stop_now:
            break
    bar.close()

    export_dir = None
    if step >= config.max_steps and config.export:
        export_dir = output_dir / EXPORT_DIR
        if is_main:
            setup.export(model, export_dir)
        barrier()
    del wrapped
    cleanup()
    return TrainResult(output_dir=output_dir, step=step, last_metrics=last_metrics, checkpoint=last_checkpoint,
                       export_dir=export_dir)


def _prune_checkpoints(output_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)

"""Resumable training checkpoints, in safetensors and JSON (nothing pickled).

A checkpoint is a folder `output_dir/checkpoints/step_NNNNNN/`:

    trainable.safetensors   the trainable parameters (frozen parts are rebuilt from where they came from)
    optimizer.safetensors   AdamW's per-parameter tensors, as "state.<index>.<key>"
    rng_rank<r>.json        this process's torch / numpy / python RNG states (dropout differs per process)
    state.json              step, data position, optimizer groups and scalar state, scheduler, config

It is written to a temporary folder and renamed, so a run killed mid-save leaves the previous checkpoint as
the newest complete one. Restoring all of it makes the continued run bit-for-bit the run that never stopped.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fovea.training.weights import load_trainable_state, trainable_state

CHECKPOINT_PREFIX = "step_"


@dataclass(slots=True)
class TrainingPosition:
    step: int
    """Optimizer steps done."""
    epoch: int
    """Current epoch of the sampler."""
    offset: int
    """Samples of this epoch each process has consumed (a multiple of the batch size)."""


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:06d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


# ---------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


# ---------------------------------------------------------------- optimizer state


def _split_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    per_param: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        per_param.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        per_param.setdefault(int(index), {})[key] = value
    return {"state": per_param, "param_groups": meta["param_groups"]}


# ---------------------------------------------------------------- save / load


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, position: TrainingPosition,
                    config: dict[str, Any], rank: int, world_size: int, barrier) -> None:
    """Every process writes its RNG state; the main process writes the rest and publishes the folder.
    `barrier()` synchronises the processes (a no-op for one process)."""
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    (partial / f"rng_rank{rank}.json").write_text(json.dumps(rng_state()))
    if rank == 0:
        save_file(trainable_state(model), str(partial / "trainable.safetensors"))
        tensors, optimizer_meta = _split_optimizer_state(optimizer)
        save_file(tensors, str(partial / "optimizer.safetensors"))
        state = {"position": {"step": position.step, "epoch": position.epoch, "offset": position.offset},
                 "optimizer": optimizer_meta, "scheduler": scheduler.state_dict(), "config": config,
                 "world_size": world_size}
        (partial / "state.json").write_text(json.dumps(state, indent=1))
    barrier()
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    barrier()


def read_checkpoint_config(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "state.json").read_text())["config"]


def load_checkpoint(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None, rank: int,
                    world_size: int) -> TrainingPosition:
    """Restore model (trainable part), optimizer, scheduler and this process's RNG; return the position."""
    folder = Path(folder)
    state = json.loads((folder / "state.json").read_text())
    if state["world_size"] != world_size:
        raise ValueError(f"{folder} was written by {state['world_size']} processes, this run has {world_size}: "
                         "the data order would differ; resume with the same number of processes")
    load_trainable_state(model, load_file(str(folder / "trainable.safetensors")))
    if optimizer is not None:
        tensors = load_file(str(folder / "optimizer.safetensors"))
        optimizer.load_state_dict(_join_optimizer_state(tensors, state["optimizer"]))
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(json.loads((folder / f"rng_rank{rank}.json").read_text()))
    return TrainingPosition(**state["position"])

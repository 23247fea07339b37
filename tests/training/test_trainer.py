"""The training loop: exact resume, two torchrun processes equal one process, metrics/curves/checkpoints."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fovea.training.checkpoint import list_checkpoints
from fovea.training.config import TrainConfig
from fovea.training.trainer import train
from tests.training.tiny import model_json, qformer_tokenizer, shapes_data

TIMEOUT_S = 300
TIMING_KEYS = ("samples_per_s", "elapsed_s")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    data = shapes_data(folder / "shapes", num=40)
    qformer_tokenizer().save_pretrained(folder / "qtok")
    return {"folder": folder, "train": str(data["train"]), "qtok": str(folder / "qtok"),
            "model": model_json(folder / "model.json", dropout=0.1),
            "model_no_dropout": model_json(folder / "model_nd.json", dropout=0.0)}


def stage1_config(files, output_dir, **overrides) -> TrainConfig:
    values = dict(stage="stage1", train_data=files["train"], output_dir=str(output_dir), model_config=files["model"],
                  qformer_tokenizer=files["qtok"], batch_size=4, grad_accum_steps=2, max_steps=6, warmup_steps=2,
                  lr=1e-3, max_text_len=20, save_every=100, progress=False, export=False)
    values.update(overrides)
    return TrainConfig(**values)


def metrics(output_dir):
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def test_resume_continues_bit_for_bit(files):
    """6 steps straight == 3 steps, stop, resume, 3 steps: parameters, AdamW state and every logged loss.
    Dropout is on, epochs end mid-run and steps accumulate two micro-batches, so RNG, data position and
    scheduler all have to come back exactly."""
    straight = train(stage1_config(files, files["folder"] / "straight"))
    stopped = train(stage1_config(files, files["folder"] / "split", stop_at_step=3))
    assert stopped.step == 3 and [p.name for p in list_checkpoints(stopped.output_dir)] == ["step_000003"]
    resumed = train(stage1_config(files, files["folder"] / "split", resume="latest"))
    assert straight.step == resumed.step == 6
    assert straight.last_metrics["epoch"] >= 1  # an epoch ended mid-run
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        a, b = load_file(straight.checkpoint / name), load_file(resumed.checkpoint / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    assert metrics(straight.output_dir) == metrics(resumed.output_dir)
    assert len(metrics(straight.output_dir)) == 6
    # and resuming is not trivially equal: the first step's parameters differ from the last's
    first = train(stage1_config(files, files["folder"] / "one", max_steps=6, stop_at_step=1))
    moved = load_file(first.checkpoint / "trainable.safetensors")
    final = load_file(straight.checkpoint / "trainable.safetensors")
    assert max((moved[k] - final[k]).abs().max().item() for k in final) > 1e-3


def test_metrics_curves_and_loss_parts(files):
    result = train(stage1_config(files, files["folder"] / "parts", max_steps=2, grad_accum_steps=1,
                                 model_config=files["model_no_dropout"]))
    rows = metrics(result.output_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["loss"] == pytest.approx(row["itc"] + row["itm"] + row["itg"], rel=1e-5)
    assert rows[0]["lr"] == pytest.approx(1e-3 / 2)  # first warm-up step
    assert (result.output_dir / "loss_curves.png").stat().st_size > 1000


def reordered_for_two_processes(lines, per_rank):
    """One-process file order that reproduces the two-process global batches: DistributedSampler without
    shuffling gives rank r the indices r, r+2, ...; global batch s is rank 0's batch s then rank 1's."""
    ranks = [list(range(r, len(lines), 2)) for r in range(2)]
    order = []
    for s in range(len(ranks[0]) // per_rank):
        for r in range(2):
            order.extend(ranks[r][s * per_rank:(s + 1) * per_rank])
    return [lines[i] for i in order]


def test_two_torchrun_processes_equal_one_process(files, tmp_path):
    lines = Path(files["train"]).read_text().splitlines()[:24]
    two_data = tmp_path / "two.jsonl"
    one_data = tmp_path / "one.jsonl"
    two_data.write_text("\n".join(lines) + "\n")
    one_data.write_text("\n".join(reordered_for_two_processes(lines, per_rank=4)) + "\n")
    # the image paths are relative to the JSONL's folder
    os.symlink(Path(files["train"]).parent / "images", tmp_path / "images")
    # Adam's update is about lr * g / (|g| + eps): with eps 1e-8 a gradient that is float32 rounding noise
    # around zero (1e-8..1e-7, summed in another order by two processes) can flip sign and move a weight by
    # up to 2 lr. eps 1e-4 keeps such noise proportional (far below 1e-5) while real gradients (>= 1e-3)
    # still get Adam's normalised steps, so a real mismatch (per-process token means: about 1e-3) shows.
    common = dict(model_config=files["model_no_dropout"], grad_accum_steps=1, max_steps=3, shuffle=False, lr=1e-4,
                  adam_eps=1e-4)
    one = train(stage1_config(files, tmp_path / "one", train_data=str(one_data), batch_size=8, **common))

    config = stage1_config(files, tmp_path / "two", train_data=str(two_data), batch_size=4, **common)
    (tmp_path / "two.json").write_text(json.dumps({k: v for k, v in config.to_dict().items() if k != "stage"}))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    command = [sys.executable, "-m", "fovea.training", "stage1", "--config", str(tmp_path / "two.json"),
               "--nproc", "2"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
                          cwd=Path(__file__).parents[2])
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    two_checkpoint = list_checkpoints(tmp_path / "two")[-1]
    a, b = load_file(one.checkpoint / "trainable.safetensors"), load_file(two_checkpoint / "trainable.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"two processes vs one: largest parameter difference {worst:.2e}")
    assert worst < 1e-5, worst
    start = train(stage1_config(files, tmp_path / "start", train_data=str(one_data), batch_size=8,
                                **{**common, "max_steps": 3, "stop_at_step": 1}))
    moved = load_file(start.checkpoint / "trainable.safetensors")
    assert max((moved[k] - a[k]).abs().max().item() for k in a) > 1e-4  # steps 2 and 3 did change weights
    logged_one, logged_two = metrics(one.output_dir), metrics(tmp_path / "two")
    for row_one, row_two in zip(logged_one, logged_two, strict=True):
        for key in ("loss", "itc", "itm", "itg"):
            assert row_one[key] == pytest.approx(row_two[key], abs=2e-6), key

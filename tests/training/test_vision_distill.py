"""The demo's size-robust ViT: distillation pulls the ViT's output for scenes rendered at other sizes onto its
output for the same scenes at its own size, and the result replaces exactly the ViT of a BLIP-2 checkpoint."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from fovea.multimodal.processors import BlipImageProcessor
from fovea.training.shapes import generate_shapes
from fovea.training.vision_distill import (distill_vision, load_pairs, load_teacher, mse_by_size,
                                           replace_vision_model)
from fovea.training.vision_pretrain import pretrain_vision

SIZES = (40, 64, 96)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """16 scenes at 48 px, the same 16 at 40/64/96 px, and a small ViT pre-trained on the 48 px ones."""
    root = tmp_path_factory.mktemp("distill")
    own = generate_shapes(root / "own", num=16, seed=3, image_size=48, splits=(1, 0, 0))["train"]
    sized = generate_shapes(root / "sized", num=16, seed=3, image_size=SIZES, splits=(1, 0, 0))["train"]
    pretrain_vision(str(own), str(root / "teacher"), steps=20, batch_size=8, lr=2e-3, hidden=32, layers=1, heads=4,
                    patch=16, image_size=48, bf16=False, log=lambda _: None)
    return root, own, sized


def test_distilled_vit_reads_other_sizes_as_the_teacher_reads_its_own(scenes):
    root, own, sized = scenes
    lines = []
    result = distill_vision(str(root / "teacher"), str(own), str(sized), str(root / "student"), steps=60,
                            batch_size=16, lr=3e-3, own_size_fraction=0.25, val_data=str(own),
                            val_sizes_data=str(sized), bf16=False, log=lines.append)
    before, after = result["val_mse_before"], result["val_mse_after"]
    assert sorted(before) == sorted(after) == ["40", "64", "96"]
    assert all(before[s] > 0 for s in before)
    # what the distillation is for: the other sizes' features move far toward the teacher's 48 px ones ...
    assert sum(after.values()) < 0.5 * sum(before.values()), lines
    # ... without losing the scenes at the teacher's own size
    assert result["val_mse_own_view"] < 0.5 * min(before.values()), lines
    # the saved student is what the numbers were measured on
    student, _, processor = load_teacher(root / "student")
    teacher = load_teacher(root / "teacher")[0].eval()
    views = load_pairs(own, sized, processor)
    with torch.no_grad():
        targets = teacher(views.own)
    measured = mse_by_size(student.eval(), views, targets)
    assert measured == pytest.approx({int(s): e for s, e in after.items()}, rel=1e-4)


def test_pairs_are_the_same_scenes_or_an_error(scenes, tmp_path):
    root, own, sized = scenes
    views = load_pairs(own, sized, BlipImageProcessor(size=(48, 48)))
    assert views.own.shape == views.sizes.shape == (16, 3, 48, 48)
    assert sorted(set(views.image_sizes)) == list(SIZES)
    other_seed = generate_shapes(tmp_path / "o", num=16, seed=4, image_size=SIZES, splits=(1, 0, 0))["train"]
    with pytest.raises(ValueError, match="not the scenes of"):
        load_pairs(own, other_seed, BlipImageProcessor(size=(48, 48)))
    fewer = generate_shapes(tmp_path / "f", num=8, seed=3, image_size=SIZES, splits=(1, 0, 0))["train"]
    with pytest.raises(ValueError, match="no rendering of scene"):
        load_pairs(own, fewer, BlipImageProcessor(size=(48, 48)))


def test_replace_vision_model_swaps_the_vit_and_keeps_every_other_tensor(scenes, tmp_path):
    root, own, sized = scenes
    if not (root / "student").is_dir():
        distill_vision(str(root / "teacher"), str(own), str(sized), str(root / "student"), steps=2, batch_size=4,
                       bf16=False, log=lambda _: None)
    teacher = load_file(str(root / "teacher" / "model.safetensors"))
    student = load_file(str(root / "student" / "model.safetensors"))
    assert any(not torch.equal(teacher[n], student[n]) for n in teacher)
    model_dir = tmp_path / "blip2"
    model_dir.mkdir()
    others = {"qformer.layernorm.weight": torch.randn(32), "language_model.lm_head.weight": torch.randn(8, 4)}
    save_file({**teacher, **others}, str(model_dir / "model.safetensors"))
    assert replace_vision_model(model_dir, root / "student") == model_dir / "model.safetensors"
    swapped = load_file(str(model_dir / "model.safetensors"))
    assert sorted(swapped) == sorted({**teacher, **others})
    assert all(torch.equal(swapped[n], student[n]) for n in student)
    assert all(torch.equal(swapped[n], t) for n, t in others.items())

    save_file({**{n: t for n, t in teacher.items() if "layers.0.mlp" not in n}, **others},
              str(model_dir / "model.safetensors"))
    with pytest.raises(ValueError, match="differ .* by name"):
        replace_vision_model(model_dir, root / "student")
    wrong = {**teacher, **others, "vision_model.post_layernorm.weight": torch.zeros(64)}
    save_file(wrong, str(model_dir / "model.safetensors"))
    with pytest.raises(ValueError, match="post_layernorm.weight is"):
        replace_vision_model(model_dir, root / "student")


def test_the_same_run_writes_the_same_weights(scenes, tmp_path):
    root, own, sized = scenes
    runs = []
    for name in ("a", "b"):
        distill_vision(str(root / "teacher"), str(own), str(sized), str(tmp_path / name), steps=3, batch_size=8,
                       log=lambda _: None)
        runs.append(load_file(str(tmp_path / name / "model.safetensors")))
    assert runs[0].keys() == runs[1].keys() and all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])

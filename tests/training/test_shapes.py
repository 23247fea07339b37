"""The synthetic shapes generator: deterministic, captions and answers true to the recorded scene, the scene
true to the pixels, splits disjoint."""
import json
import re

import numpy as np
import pytest
from PIL import Image

from fovea.training.data import ImageTextDataset
from fovea.training.shapes import COLOURS, DEFAULT_IMAGE_SIZE, generate_shapes, main

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CELLS = [["top left", "top", "top right"], ["left", "center", "right"], ["bottom left", "bottom", "bottom right"]]


def read_split(folder, name):
    return [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    generate_shapes(folder, num=60, seed=3)
    return folder


def all_records(folder):
    return [r for name in ("train", "val", "test") for r in read_split(folder, name)]


def test_same_seed_same_bytes_other_seed_other_scenes(generated, tmp_path):
    generate_shapes(tmp_path / "again", num=60, seed=3)
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "meta.json"):
        assert (tmp_path / "again" / name).read_bytes() == (generated / name).read_bytes(), name
    for index in (0, 17, 59):
        image = f"images/{index:06d}.png"
        assert (tmp_path / "again" / image).read_bytes() == (generated / image).read_bytes()
    generate_shapes(tmp_path / "other", num=60, seed=4)
    captions = {r["image_id"]: r["caption"] for r in all_records(generated)}
    other = {r["image_id"]: r["caption"] for r in all_records(tmp_path / "other")}
    assert sum(captions[i] != other[i] for i in captions) > 40


def test_splits_are_disjoint_and_cover_every_image(generated):
    splits = {name: [r["image_id"] for r in read_split(generated, name)] for name in ("train", "val", "test")}
    assert [len(ids) for ids in splits.values()] == [48, 6, 6]
    assert sorted(sum(splits.values(), [])) == list(range(60))
    for name, ids in splits.items():
        assert ids == sorted(ids), name  # each split in image order


def test_captions_describe_the_recorded_scene(generated):
    for record in all_records(generated):
        match = re.fullmatch(r"(.+) on an? (\w+) background", record["caption"])
        assert match, record["caption"]
        scene = record["scene"]
        assert match.group(2) == scene["background"]
        groups = [g.split(" ") for g in match.group(1).split(" and ")]
        described = 0
        for count_word, size, colour, shape_word in groups:
            count = NUMBERS.index(count_word)
            shape = shape_word[:-1] if count > 1 else shape_word
            assert shape_word == (shape + "s" if count > 1 else shape)
            objects = [o for o in scene["objects"] if o["shape"] == shape]
            assert len(objects) == count, record["caption"]
            assert {(o["colour"], o["size"]) for o in objects} == {(colour, size)}
            described += count
        assert described == len(scene["objects"])  # nothing in the scene left out of the caption
        kinds = [g[3].rstrip("s") for g in groups]
        assert kinds == [s for s in ("circle", "square", "triangle", "diamond") if s in kinds]  # canonical order


@pytest.fixture(scope="module")
def several_sizes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes_sizes")
    generate_shapes(folder, num=24, seed=3, image_size=(40, 64, 96))
    return folder


@pytest.mark.parametrize("folder", ["generated", "several_sizes"])
def test_pixels_show_the_recorded_scene(folder, request):
    generated = request.getfixturevalue(folder)
    for record in all_records(generated)[:30]:
        pixels = np.asarray(Image.open(generated / record["image"]))
        side = record["image_size"]
        assert pixels.shape == (side, side, 3)
        scene = record["scene"]
        assert tuple(pixels[0, 0]) == COLOURS[scene["background"]]  # corners are never covered
        for obj in scene["objects"]:
            x, y = obj["center"]
            assert tuple(pixels[y, x]) == COLOURS[obj["colour"]]
            assert CELLS[y * 3 // side][x * 3 // side] == CELLS[obj["cell"] // 3][obj["cell"] % 3]
        colours_drawn = {tuple(c) for c in pixels.reshape(-1, 3)}
        assert colours_drawn == {COLOURS[scene["background"]]} | {COLOURS[o["colour"]] for o in scene["objects"]}


def test_default_size_and_several_sizes(generated, several_sizes):
    """One size by default (the shipped demo model's); several cycle over the scenes, each scene the same
    layout scaled: same caption and answers as at the default size."""
    assert DEFAULT_IMAGE_SIZE == 48
    assert {r["image_size"] for r in all_records(generated)} == {48}
    assert json.loads((generated / "meta.json").read_text())["image_size"] == 48
    assert json.loads((several_sizes / "meta.json").read_text())["image_size"] == [40, 64, 96]
    by_id = {r["image_id"]: r for r in all_records(generated)}
    for record in all_records(several_sizes):
        assert record["image_size"] == (40, 64, 96)[record["image_id"] % 3]
        assert Image.open(several_sizes / record["image"]).size == (record["image_size"],) * 2
        same = by_id[record["image_id"]]
        assert (record["caption"], record["qa"]) == (same["caption"], same["qa"])
        assert [o["cell"] for o in record["scene"]["objects"]] == [o["cell"] for o in same["scene"]["objects"]]
    with pytest.raises(ValueError, match="image_size"):
        generate_shapes(several_sizes / "bad", num=2, image_size=(48, 8))


def test_answers_follow_from_the_scene(generated):
    kinds = set()
    for record in all_records(generated):
        objects, scene = record["scene"]["objects"], record["scene"]
        for qa in record["qa"]:
            q, a = qa["question"], qa["answer"]
            kinds.add(qa["type"])
            if m := re.fullmatch(r"how many (\w+)s are there\?", q):
                shape = m.group(1)
                expected = len(objects) if shape == "shape" else sum(o["shape"] == shape for o in objects)
                assert a == NUMBERS[expected], q
            elif m := re.fullmatch(r"what colour (?:is|are) the (\w+?)s?\?", q):
                if m.group(1) == "background":
                    assert a == scene["background"]
                else:
                    assert {o["colour"] for o in objects if o["shape"] == m.group(1)} == {a}, q
            elif m := re.fullmatch(r"what size (?:is|are) the (\w+?)s?\?", q):
                assert {o["size"] for o in objects if o["shape"] == m.group(1)} == {a}, q
            elif m := re.fullmatch(r"which shape is (\w+)\?", q):
                assert {o["shape"] for o in objects if o["colour"] == m.group(1)} == {a}, q
            elif m := re.fullmatch(r"is there a (\w+) (\w+)\?", q):
                present = any(o["colour"] == m.group(1) and o["shape"] == m.group(2) for o in objects)
                assert a == ("yes" if present else "no"), q
            elif m := re.fullmatch(r"where is the (\w+)\?", q):
                (obj,) = [o for o in objects if o["shape"] == m.group(1)]  # asked only of single shapes
                assert a == CELLS[obj["cell"] // 3][obj["cell"] % 3], q
            else:
                pytest.fail(f"unexpected question {q!r}")
    assert kinds == {"count", "colour", "size", "shape", "exists", "position", "background", "total"}


def test_every_word_is_in_the_small_closed_vocabulary(generated):
    vocabulary = set(json.loads((generated / "meta.json").read_text())["vocabulary"])
    assert len(vocabulary) < 60
    for record in all_records(generated):
        texts = [record["caption"]] + [t for qa in record["qa"] for t in (qa["question"].rstrip("?"), qa["answer"])]
        for text in texts:
            assert set(text.split()) <= vocabulary, text


def test_cli_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option, default in [("--num", "1000"), ("--seed", "0"), ("--image-size", "48"), ("--splits", "0.8,0.1,0.1"),
                            ("--max-groups", "2"), ("--max-count", "3")]:
        assert re.search(rf"{option}\b.*?\(default: {re.escape(default)}\)", text, re.S), option
    assert "--out" in text


def test_cli_writes_the_dataset_and_rejects_bad_options(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "d"), "--num", "10", "--seed", "1", "--image-size", "48",
                 "--splits", "0.6,0.2,0.2"]) == 0
    assert "6 train, 2 val, 2 test" in capsys.readouterr().out
    assert Image.open(tmp_path / "d" / "images" / "000009.png").size == (48, 48)
    assert main(["--out", str(tmp_path / "m"), "--num", "4", "--image-size", "40,96"]) == 0
    assert [Image.open(tmp_path / "m" / "images" / f"00000{i}.png").size[0] for i in range(4)] == [40, 96, 40, 96]
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "e"), "--image-size", "48,x"])
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "e"), "--splits", "0.5,0.5,0.5"])
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "e"), "--max-groups", "4", "--max-count", "3"])  # 12 shapes > 9 cells


def test_the_jsonl_feeds_the_pair_dataset(generated):
    records = read_split(generated, "val")
    dataset = ImageTextDataset.from_jsonl(generated / "val.jsonl")
    assert len(dataset) == len(records)
    sample = dataset[0]
    assert sample.image.size == (48, 48) and sample.caption == records[0]["caption"]
    assert sample.image_id == records[0]["image_id"]

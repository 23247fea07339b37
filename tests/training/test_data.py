import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fovea.training.data import (ImageTextDataset, PairCollator, ResumableDistributedSampler, stable_image_id)

# (file name, image id, captions): "a" has two captions, ids mix strings and ints
IMAGES = [("a.png", "coco_1", ["a red square", "a square that is red"]),
          ("b.jpg", 42, ["two circles"]),
          ("c.png", "coco_3", ["a blue triangle"])]


def write_images(folder):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, _, _ in IMAGES:
        pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name, quality=90)


def expected_pairs(folder):
    pairs = []
    for name, image_id, captions in IMAGES:
        with Image.open(folder / name) as image:
            pixels = np.asarray(image.convert("RGB")).tobytes()
        pairs.extend((caption, stable_image_id(image_id), pixels) for caption in captions)
    return pairs


def read_pairs(dataset):
    return [(s.caption, stable_image_id(s.image_id), np.asarray(s.image).tobytes()) for s in dataset]


def write_tar(path, folder, txt_for=()):
    with tarfile.open(path, "w") as tar:
        for index, (name, image_id, captions) in enumerate(IMAGES):
            key = f"shard0/{index:04d}"
            extension = name.rsplit(".", 1)[1]
            tar.add(folder / name, arcname=f"{key}.{extension}")
            if name in txt_for:
                payload = captions[0].encode()
                member = f"{key}.txt"
            else:
                payload = json.dumps({"caption": captions, "image_id": image_id}).encode()
                member = f"{key}.json"
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_three_formats_read_the_same_pairs(tmp_path):
    images = tmp_path / "images"
    write_images(images)
    with (tmp_path / "pairs.jsonl").open("w") as f:  # relative to the JSONL file's folder
        for name, image_id, captions in IMAGES:
            for caption in captions:
                f.write(json.dumps({"image": f"images/{name}", "caption": caption, "image_id": image_id}) + "\n")
    (tmp_path / "karpathy.json").write_text(json.dumps(
        [{"image": name, "caption": captions, "image_id": image_id} for name, image_id, captions in IMAGES]))
    write_tar(tmp_path / "shard-000.tar", images)

    expected = expected_pairs(images)
    assert read_pairs(ImageTextDataset.from_jsonl(tmp_path / "pairs.jsonl")) == expected
    assert read_pairs(ImageTextDataset.from_karpathy(tmp_path / "karpathy.json", images)) == expected
    assert read_pairs(ImageTextDataset.from_tar_shards(tmp_path / "shard-000.tar")) == expected


def test_tar_txt_captions_and_default_ids(tmp_path):
    write_images(tmp_path)
    write_tar(tmp_path / "s.tar", tmp_path, txt_for=("b.jpg",))
    dataset = ImageTextDataset.from_tar_shards([tmp_path / "s.tar"])
    assert [r.caption for r in dataset.records] == ["a red square", "a square that is red", "two circles",
                                                    "a blue triangle"]
    assert dataset.records[2].image_id == "s.tar/shard0/0001"


def test_missing_image_id_defaults_to_the_image_path(tmp_path):
    write_images(tmp_path)
    lines = [{"image": "a.png", "caption": "x"}, {"image": "a.png", "caption": "y"}, {"image": "b.jpg", "caption": "z"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    ids = [r.image_id for r in ImageTextDataset.from_jsonl(tmp_path / "p.jsonl").records]
    assert ids[0] == ids[1] != ids[2]


def test_collate_maps_ids_to_stable_ints_and_applies_the_transform(tmp_path):
    write_images(tmp_path)
    (tmp_path / "k.json").write_text(json.dumps(
        [{"image": name, "caption": captions, "image_id": image_id} for name, image_id, captions in IMAGES]))
    dataset = ImageTextDataset.from_karpathy(tmp_path / "k.json", tmp_path)
    batch = PairCollator()([dataset[i] for i in range(4)])
    assert [image.size for image in batch.images] == [(10, 12)] * 4
    assert batch.captions == ["a red square", "a square that is red", "two circles", "a blue triangle"]
    assert batch.image_ids.dtype == torch.long
    digest = hashlib.blake2b(b"coco_1", digest_size=8).digest()
    assert batch.image_ids.tolist() == [int.from_bytes(digest, "big") >> 1] * 2 + [42, stable_image_id("coco_3")]
    assert len(set(batch.image_ids.tolist())) == 3  # same image -> same id, different images -> different ids

    to_tensor = ToTensor()
    loader = DataLoader(dataset, batch_size=2, collate_fn=PairCollator(to_tensor), num_workers=1)
    batches = list(loader)  # the collator and dataset pickle into a worker
    assert batches[0].images.shape == (2, 3, 12, 10) and batches[0].images.dtype == torch.float32
    assert torch.equal(torch.cat([b.image_ids for b in batches]), batch.image_ids)


class ToTensor:
    def __call__(self, image):
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def test_bad_inputs_are_errors_that_say_where(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "caption": "x"}\n{"image": "b.png"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        ImageTextDataset.from_jsonl(tmp_path / "bad.jsonl")
    with tarfile.open(tmp_path / "nocap.tar", "w") as tar:
        info = tarfile.TarInfo("k1.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(ValueError, match="no caption member"):
        ImageTextDataset.from_tar_shards(tmp_path / "nocap.tar")
    with tarfile.open(tmp_path / "gz.tar.gz", "w:gz") as tar:
        tar.addfile(tarfile.TarInfo("empty.txt"), io.BytesIO(b""))
    with pytest.raises(ValueError, match="uncompressed"):
        ImageTextDataset.from_tar_shards(tmp_path / "gz.tar.gz")


class Indices(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def test_sampler_shards_over_ranks_and_resumes_mid_epoch():
    dataset = Indices(11)
    samplers = [ResumableDistributedSampler(dataset, num_replicas=2, rank=r, seed=3) for r in range(2)]
    for sampler in samplers:
        sampler.set_epoch(4)
    full = [list(s) for s in samplers]
    assert [len(f) for f in full] == [5, 5]  # drop_last: both ranks get the same number of samples
    assert not set(full[0]) & set(full[1])
    assert len(set(full[0]) | set(full[1])) == 10

    samplers[1].set_position(epoch=4, offset=3)
    assert list(samplers[1]) == full[1][3:] and len(samplers[1]) == 2
    resumed = ResumableDistributedSampler(dataset, num_replicas=2, rank=1, seed=3)
    resumed.load_state_dict(samplers[1].state_dict())
    assert list(resumed) == full[1][3:]
    resumed.set_epoch(5)  # the next epoch starts at its beginning, in a new order
    assert len(list(resumed)) == 5 and list(resumed) != full[1]

    with pytest.raises(ValueError, match="num_replicas saved 2 now 1"):
        ResumableDistributedSampler(dataset, seed=3).load_state_dict(samplers[1].state_dict())


def test_sampler_without_process_group_is_one_process():
    sampler = ResumableDistributedSampler(Indices(6), shuffle=False)
    assert (sampler.num_replicas, sampler.rank) == (1, 0)
    assert list(sampler) == list(range(6))

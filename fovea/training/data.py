"""Image-text pair datasets (JSONL, COCO-Karpathy JSON, webdataset tar shards), their collate, and a
distributed sampler that resumes mid-epoch.

All three formats become one map-style `ImageTextDataset` over `PairRecord`s, so shuffling, sharding over
processes and resuming work the same way for each. Tar shards are indexed once (member offsets, read with the
standard `tarfile` module) and read by seeking, so they need no webdataset package and no sequential pass.

Image ids: pairs sharing an image id are never each other's negatives (see `fovea.training.losses`). A record
keeps the id as its source wrote it (int or str); the collate maps it to an int64 with `stable_image_id`, the
same in every process and every run.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler

ImageId = Union[int, str]
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")
"""Image members a tar shard sample may have (webdataset keys, lower case)."""


@dataclass(frozen=True, slots=True)
class PairRecord:
    image_path: str
    caption: str
    image_id: ImageId
    image_offset: int = 0
    """Byte offset of the encoded image in `image_path` (non-zero for a tar member)."""
    image_size: int = -1
    """Bytes to read from the offset; -1 reads the whole file."""
    prompt: str | None = None
    """Text before the caption that is not a target (stage 2, e.g. a question); None: the run's default."""


@dataclass(slots=True)
class ImageTextSample:
    image: Image.Image
    """Decoded and converted to RGB."""
    caption: str
    image_id: ImageId
    prompt: str | None = None


@dataclass(slots=True)
class ImageTextBatch:
    images: torch.Tensor | list[Image.Image]
    """(B, C, H, W) when the collate's transform returns tensors, else what it returns (PIL without one)."""
    captions: list[str]
    image_ids: torch.Tensor
    """(B,) int64, equal exactly for pairs of the same image (`stable_image_id`)."""
    prompts: list[str | None] | None = None
    """Per pair, the record's prompt (None where it has none)."""


class ImageTextDataset(Dataset):
    """Map-style dataset of (image, caption, image_id); one item per caption."""

    def __init__(self, records: Sequence[PairRecord]):
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> ImageTextSample:
        record = self.records[index]
        return ImageTextSample(image=_read_image(record), caption=record.caption, image_id=record.image_id,
                               prompt=record.prompt)

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike) -> "ImageTextDataset":
        """One JSON object per line: {"image": path, "caption": str, "image_id": int | str (optional),
        "prompt": str (optional, stage 2)}.
        Relative image paths are resolved against the JSONL file's folder; a missing image_id defaults to
        the resolved image path, so captions of one image file still share an id."""
        path = Path(path)
        records = []
        with path.open(encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_number}"
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e})") from e
                records.extend(_records_from_entry(entry, path.parent, where))
        return cls(records)

    @classmethod
    def from_karpathy(cls, annotation_path: str | os.PathLike,
                      image_root: str | os.PathLike) -> "ImageTextDataset":
        """A COCO-Karpathy-style JSON list [{"image": relative path, "caption": str | [str, ...],
        "image_id": ... (optional)}, ...] with images under `image_root`; a caption list gives one pair per
        caption, all with the entry's image id."""
        annotation_path = Path(annotation_path)
        entries = json.loads(annotation_path.read_text(encoding="utf-8"))
        if not isinstance(entries, list):
            raise ValueError(f"{annotation_path}: expected a JSON list of entries, got {type(entries).__name__}")
        records = []
        for index, entry in enumerate(entries):
            records.extend(_records_from_entry(entry, Path(image_root), f"{annotation_path}[{index}]"))
        return cls(records)

    @classmethod
    def from_tar_shards(cls, shards: str | os.PathLike | Sequence[str | os.PathLike]) -> "ImageTextDataset":
        """webdataset-style tar shards: members grouped by key (the path up to the first dot of the file
        name), each sample an image (.jpg/.jpeg/.png) plus either .json ({"caption": str | [str, ...],
        "image_id": optional}) or .txt (the caption). A missing image_id defaults to "<shard name>/<key>".
        Samples without an image or a caption are an error naming the shard and key."""
        if isinstance(shards, (str, os.PathLike)):
            shards = [shards]
        records = []
        for shard in shards:
            records.extend(_index_tar_shard(Path(shard)))
        return cls(records)


def _records_from_entry(entry: Any, image_root: Path, where: str) -> list[PairRecord]:
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or "caption" not in entry:
        raise ValueError(f"{where}: each entry needs 'image' (a path) and 'caption'; got {entry!r:.200}")
    image_path = str(image_root / entry["image"])  # an absolute entry["image"] stays as it is
    captions = _captions(entry["caption"], where)
    image_id = _check_image_id(entry.get("image_id", image_path), where)
    prompt = entry.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"{where}: 'prompt' must be a string; got {prompt!r:.200}")
    return [PairRecord(image_path=image_path, caption=caption, image_id=image_id, prompt=prompt)
            for caption in captions]


def _captions(value: Any, where: str) -> list[str]:
    captions = [value] if isinstance(value, str) else value
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"{where}: 'caption' must be a string or a non-empty list of strings; got {value!r:.200}")
    return captions


def _check_image_id(value: Any, where: str) -> ImageId:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{where}: 'image_id' must be an int or a string; got {value!r:.200}")
    return value


def _index_tar_shard(shard: Path) -> list[PairRecord]:
    members: dict[str, dict[str, tarfile.TarInfo]] = {}  # key -> extension -> member, in shard order
    try:
        tar = tarfile.open(shard, mode="r:")  # uncompressed only: members are then read by seeking
    except tarfile.ReadError as e:
        raise ValueError(f"{shard}: not an uncompressed tar ({e}); webdataset shards are plain .tar files") from e
    with tar:
        for info in tar:
            if not info.isfile():
                continue
            folder, _, name = info.name.rpartition("/")
            stem, dot, extension = name.partition(".")
            if not dot:
                continue
            key = f"{folder}/{stem}" if folder else stem
            members.setdefault(key, {})[extension.lower()] = info
        records = []
        for key, by_extension in members.items():
            where = f"{shard} sample {key!r}"
            image = next((by_extension[e] for e in IMAGE_EXTENSIONS if e in by_extension), None)
            if image is None:
                raise ValueError(f"{where}: no image member ({', '.join(IMAGE_EXTENSIONS)}); has "
                                 f"{sorted(by_extension)}")
            if "json" in by_extension:
                meta = json.loads(tar.extractfile(by_extension["json"]).read().decode("utf-8"))
                if not isinstance(meta, dict) or "caption" not in meta:
                    raise ValueError(f"{where}: the .json member needs a 'caption'")
                captions = _captions(meta["caption"], where)
                image_id = _check_image_id(meta.get("image_id", f"{shard.name}/{key}"), where)
            elif "txt" in by_extension:
                captions = [tar.extractfile(by_extension["txt"]).read().decode("utf-8").strip()]
                image_id = f"{shard.name}/{key}"
            else:
                raise ValueError(f"{where}: no caption member (.json or .txt); has {sorted(by_extension)}")
            records.extend(PairRecord(image_path=str(shard), caption=caption, image_id=image_id,
                                      image_offset=image.offset_data, image_size=image.size)
                           for caption in captions)
    return records


def _read_image(record: PairRecord) -> Image.Image:
    with open(record.image_path, "rb") as f:
        f.seek(record.image_offset)
        data = f.read(record.image_size)
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except Exception as e:  # Pillow raises OSError, SyntaxError, ... on bad data
        raise ValueError(f"could not decode the image of {record}: {e}") from e


def stable_image_id(image_id: ImageId) -> int:
    """An int64 for an image id, the same in every process and run: ints are kept as they are; strings
    become the first 63 bits of their BLAKE2b digest (Python's hash() is salted per process)."""
    if isinstance(image_id, bool):
        raise TypeError(f"image_id must be an int or a str, not bool ({image_id!r})")
    if isinstance(image_id, int):
        if not -2**63 <= image_id < 2**63:
            raise ValueError(f"image_id {image_id} does not fit in int64")
        return image_id
    if isinstance(image_id, str):
        digest = hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "big") >> 1
    raise TypeError(f"image_id must be an int or a str, not {type(image_id).__name__}")


class PairCollator:
    """Collate `ImageTextSample`s into an `ImageTextBatch`.

    transform: applied to each PIL image (e.g. the BLIP image processor's resize + normalise); tensor
    outputs of one shape are stacked to (B, C, H, W). A class rather than a closure so DataLoader workers
    can pickle it.
    """

    def __init__(self, transform: Callable[[Image.Image], Any] | None = None):
        self.transform = transform

    def __call__(self, samples: Sequence[ImageTextSample]) -> ImageTextBatch:
        images = [s.image if self.transform is None else self.transform(s.image) for s in samples]
        if images and all(isinstance(image, torch.Tensor) for image in images):
            images = torch.stack(images)
        image_ids = torch.tensor([stable_image_id(s.image_id) for s in samples], dtype=torch.long)
        return ImageTextBatch(images=images, captions=[s.caption for s in samples], image_ids=image_ids,
                              prompts=[s.prompt for s in samples])


class ResumableDistributedSampler(DistributedSampler):
    """torch's DistributedSampler (same shuffle for a given seed and epoch, rank r takes every world-size-th
    index from r) that can start an epoch part-way through, for exact resume.

    The position is (epoch, offset): `offset` indices of this rank's share of `epoch` were already consumed.
    Track it from the batches the training loop actually finished (batches * batch size), not from this
    iterator, which DataLoader workers read ahead. Without a process group it is a one-process sampler.
    drop_last defaults to True so every rank gets the same number of whole batches of distinct samples.
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = True):
        initialized = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if initialized else 1
        if rank is None:
            rank = dist.get_rank() if initialized else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.offset = 0

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning."""
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, offset: int) -> None:
        if not 0 <= offset <= self.num_samples:
            raise ValueError(f"offset={offset} must be in [0, {self.num_samples}] (this rank's samples per epoch)")
        self.epoch = epoch
        self.offset = offset

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.offset:])

    def __len__(self) -> int:
        return self.num_samples - self.offset

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "num_replicas": self.num_replicas,
                "dataset_size": len(self.dataset)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a position; the seed, the number of processes and the dataset size must be the ones it
        was saved with, or the order would differ and the resume would not be exact."""
        mine = {"seed": self.seed, "num_replicas": self.num_replicas, "dataset_size": len(self.dataset)}
        differing = {name: (state[name], value) for name, value in mine.items() if state[name] != value}
        if differing:
            detail = ", ".join(f"{name} saved {saved} now {now}" for name, (saved, now) in differing.items())
            raise ValueError(f"cannot resume the data order exactly: {detail}")
        self.set_position(state["epoch"], state["offset"])

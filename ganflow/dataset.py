"""The prepared dataset, read: single images out of the shards, the torch Dataset of one split, and
the random transforms of real images at training time (seeded per rank, DataLoader worker and
epoch). What the encoder, the training and the evaluation read; ganflow.data writes it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch

from ganflow.artifacts import LABELS, PARTS, SPLIT, read_manifest
from ganflow.config import DataConfig
from ganflow.errors import DataError, first_line


def build_train_transform(data: DataConfig) -> A.Compose | None:
    """Random augmentation applied to real images at training time, or None.

    Whatever is applied here changes the real distribution D sees, and so what G learns to
    draw: a horizontal flip makes G draw mirrored images too (fine for faces, wrong for digits
    or text). Keep it to symmetries the data really has.
    """
    if data.hflip <= 0:
        return None
    return A.Compose([A.HorizontalFlip(p=data.hflip)], seed=0)


def load_images(path: Path) -> np.ndarray:
    """Every prepared image, all shards in order: uint8 (N, H, W, C) in memory (small data, tests)."""
    manifest = read_manifest(path)
    return np.concatenate([np.load(Path(path) / shard["file"], allow_pickle=False) for shard in manifest["shards"]])


def transform_seed(seed: int, rank: int, worker_id: int, epoch: int) -> int:
    """A distinct, reproducible augmentation seed per (seed, rank, DataLoader worker, epoch)."""
    return int(np.random.SeedSequence([seed, rank, worker_id, epoch]).generate_state(1)[0])


class ShardReader:
    """Single images out of the prepared shards by their index in the dataset, with positioned
    reads (no memory map: what a reader holds does not grow with the dataset). Picklable: each
    process opens the files itself."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.files = [Path(path) / shard["file"] for shard in manifest["shards"]]
        counts = [int(shard["count"]) for shard in manifest["shards"]]
        self.starts = np.cumsum([0, *counts])  # shard k holds indices starts[k]..starts[k+1]-1
        self.shape = tuple(manifest["shape"])
        self.offsets = [self._data_offset(f, n) for f, n in zip(self.files, counts)]
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def _data_offset(self, file: Path, count: int) -> int:
        try:
            with open(file, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read_header(fh)
                offset = fh.tell()
        except (OSError, ValueError) as exc:
            raise DataError(f"{file}: not a readable shard of the prepared dataset ({first_line(exc)})") from None
        if shape != (count, *self.shape) or dtype != np.uint8 or fortran:
            raise DataError(f"{file}: holds {dtype} {shape}, the manifest says uint8 {(count, *self.shape)}")
        return offset

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": {}}

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked copy: its parent's descriptors are not its own
            self._fds, self._pid = {}, os.getpid()
        if shard not in self._fds:
            self._fds[shard] = os.open(self.files[shard], os.O_RDONLY)
        return self._fds[shard]

    def read(self, index: int) -> np.ndarray:
        """The image at ``index`` (of the whole dataset): a uint8 (H, W, C) array of its own."""
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        size = int(np.prod(self.shape))
        offset = self.offsets[shard] + (int(index) - int(self.starts[shard])) * size
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise DataError(f"{self.files[shard]}: truncated (image {index})")
        return np.frombuffer(data, dtype=np.uint8).reshape(self.shape).copy()

    def read_many(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty((len(indices), *self.shape), dtype=np.uint8)
        for i, index in enumerate(indices):
            out[i] = self.read(int(index))
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            self.close()


class PreparedDataset(torch.utils.data.Dataset):
    """The prepared images as float tensors (C, H, W) in [-1, 1], with int labels (-1 = none).

    ``part`` picks the images: "train" (what the GAN and the encoder learn from), "validation"
    (what chooses), "test" (what reports; read by the evaluate stage only) or "all".

    albumentations 2.0.8 gives every copy of a Compose the same random stream: in each
    DataLoader worker and each Ray rank. ``reseed`` (called by ``TransformSeeder`` in each
    worker, or directly with loader_workers=0) gives each its own stream.
    """

    def __init__(self, path: Path, transform: A.Compose | None = None, *, part: str):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.images = ShardReader(self.path, self.manifest)
        labels = np.load(self.path / LABELS, allow_pickle=False)  # (N,)
        split = np.load(self.path / SPLIT, allow_pickle=False)  # (N,)
        if not int(self.images.starts[-1]) == len(labels) == len(split) == self.manifest["count"]:
            raise DataError(f"{self.path}: images, labels, split and manifest disagree on the count")
        self.indices = np.arange(len(split)) if PARTS[part] is None else np.flatnonzero(split == PARTS[part])
        self.labels = labels[self.indices]  # (len(self),)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image of the part at once: ((N, C, H, W) float in [-1, 1], labels (N,) int64),
        without the training transform."""
        x = torch.from_numpy(self.images.read_many(self.indices)).permute(0, 3, 1, 2)
        return x.float().div_(127.5).sub_(1.0), torch.as_tensor(self.labels, dtype=torch.long)

    @property
    def num_classes(self) -> int:
        return len(self.manifest["class_names"])

    def reseed(self, seed: int) -> None:
        if self.transform is not None:
            self.transform.set_random_seed(seed)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images.read(self.indices[index])  # (H, W, C) uint8
        if self.transform is not None:
            image = self.transform(image=image)["image"].reshape(image.shape)
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # (C, H, W)
        return x.float().div_(127.5).sub_(1.0), int(self.labels[index])  # [0, 255] -> [-1, 1]


class TransformSeeder:
    """``worker_init_fn`` giving each DataLoader worker of each rank its own augmentation stream.

    Set ``epoch`` before iterating the loader each epoch: non-persistent workers are
    started (and this object pickled to them) anew at each ``iter()``.
    """

    def __init__(self, seed: int, rank: int):
        self.seed = seed
        self.rank = rank
        self.epoch = 0

    def start_epoch(self, epoch: int, dataset: PreparedDataset) -> None:
        """Call before iterating each epoch. Seeds the in-process copy too (loader_workers=0)."""
        self.epoch = epoch
        dataset.reseed(transform_seed(self.seed, self.rank, 0, epoch))

    def __call__(self, worker_id: int) -> None:
        info = torch.utils.data.get_worker_info()
        info.dataset.reseed(transform_seed(self.seed, self.rank, worker_id, self.epoch))

"""How the training workers get their images: read locally, or streamed through Ray Data.

``data.ingest``:
  local     every worker reads the prepared shards itself (a PyTorch DataLoader over
            ``PreparedDataset``, a DistributedSampler for its part). On a node that does not see
            the driver's files, the driver's copy travels through Ray's object store: fine for
            small data, never for data sets larger than memory.
  ray_data  a Ray Data dataset over the prepared shards, in chunks of CHUNK images, block order
            reshuffled each epoch (seeded), split across the workers by Ray Train
            (``datasets=`` / ``get_dataset_shard``), shuffled again in a local buffer seeded per
            epoch and rank. Each read task reads its chunk's bytes straight from storage (local
            disk, or ``s3://``... through pyarrow), so what any process holds is a few chunks,
            whatever the size of the data set, and no data set is put into the object store.
            When the workers can be on other nodes, the shards are copied once to
            ``cluster.storage_path`` (content-addressed: ``datasets/<images hash>``), which every
            node reads.
  auto      ray_data when the Ray cluster has more than one node, local otherwise. On one node
            the local reader is already independent of the data set's size (positioned reads of
            single images, no memory map), and faster (benchmarks/scale.py measures both).

Reproducibility: the local path gives the same batches for the same seed and worker count.
Ray Data's split hands chunks to the workers as they ask for them, so with several workers
which rank trains on which chunk is not fixed from run to run (one worker: it is).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ganflow.artifacts import LABELS, MANIFEST, SPLIT
from ganflow.config import Config

# ganflow.dataset (torch, albumentations) and Ray are imported inside the functions that need
# them: Ray Data's read tasks import this module in fresh worker processes, and read_chunks needs
# numpy only

CHUNK = 256  # images per read task and per block: the unit the workers' shards are made of
READ_TASKS = 2  # read tasks in flight at once
SHUFFLE_BUFFER_BATCHES = 8  # each worker's local shuffle buffer, in its batches
DATASETS_DIR = "datasets"


def resolve_ingest(cfg: Config) -> str:
    """data.ingest with auto resolved, on the Ray this process has joined."""
    if cfg.data.ingest != "auto":
        return cfg.data.ingest
    return "ray_data" if _nodes() > 1 else "local"


def with_resolved_ingest(cfg: Config) -> Config:
    """A copy of ``cfg`` whose data.ingest is local or ray_data (what the run's batches depend on)."""
    ingest = resolve_ingest(cfg)
    if ingest == cfg.data.ingest:
        return cfg
    out = cfg.model_copy(deep=True)
    out.data.ingest = ingest
    return out


def _nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0)


def shards_root(cfg: Config) -> str:
    """Where the read tasks find the shards: the prepared folder itself on a one-node Ray, else a
    copy on the training's storage (cluster.storage_path), made once per content."""
    if _nodes() <= 1:
        return str(cfg.paths.prepared.resolve())
    import pyarrow.fs

    from ganflow.artifacts import read_manifest
    from ganflow.checkpoints import storage_path
    from ganflow.filesystems import storage_fs

    manifest = read_manifest(cfg.paths.prepared)
    prefix = storage_path(cfg)
    fs, base = storage_fs(prefix)
    root = f"{base.rstrip('/')}/{DATASETS_DIR}/{manifest['images_sha256'][:16]}"
    # the manifest goes last: present = complete
    if fs.get_file_info(f"{root}/{MANIFEST}").type == pyarrow.fs.FileType.NotFound:
        fs.create_dir(root, recursive=True)
        for shard in manifest["shards"]:
            tmp = f"{root}/.{shard['file']}.tmp"
            pyarrow.fs.copy_files(str(cfg.paths.prepared / shard["file"]), tmp, destination_filesystem=fs)
            fs.move(tmp, f"{root}/{shard['file']}")
        with fs.open_output_stream(f"{root}/{MANIFEST}") as out:
            out.write((cfg.paths.prepared / MANIFEST).read_bytes())
    return root if "://" not in prefix else f"{prefix.split('://', 1)[0]}://{root}"


def chunks(cfg: Config, root: str) -> list[dict[str, Any]]:
    """One item per CHUNK images of a shard that has training images: where its bytes are, and
    its images' labels and train mask (read here once: the read tasks need only the bytes)."""
    from ganflow.artifacts import TRAIN, read_manifest
    from ganflow.dataset import ShardReader

    manifest = read_manifest(cfg.paths.prepared)
    labels = np.load(cfg.paths.prepared / LABELS, allow_pickle=False)
    train = np.load(cfg.paths.prepared / SPLIT, allow_pickle=False) == TRAIN

    reader = ShardReader(cfg.paths.prepared, manifest)
    items = []
    for k, shard in enumerate(manifest["shards"]):
        start = int(reader.starts[k])
        for offset in range(0, int(shard["count"]), CHUNK):
            count = min(CHUNK, int(shard["count"]) - offset)
            mask = train[start + offset : start + offset + count]
            if not mask.any():
                continue
            items.append(
                {
                    "path": f"{root}/{shard['file']}",
                    "offset": reader.offsets[k],
                    "first": offset,
                    "count": count,
                    "labels": json.dumps(labels[start + offset : start + offset + count].tolist()),
                    "train": json.dumps(mask.astype(int).tolist()),
                }
            )
    reader.close()
    return items


def read_chunks(batch: dict[str, np.ndarray], shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """A Ray Data map: chunk items -> their training images (uint8 N x H x W x C) and labels,
    one ranged read per chunk from local disk or any pyarrow filesystem (s3://...)."""
    from ganflow.filesystems import storage_fs

    images, labels = [], []
    size = int(np.prod(shape))
    for i in range(len(batch["path"])):
        uri = str(batch["path"][i])
        fs, path = storage_fs(uri)
        count, first = int(batch["count"][i]), int(batch["first"][i])
        with fs.open_input_file(path) as fh:
            data = fh.read_at(count * size, int(batch["offset"][i]) + first * size)
        if len(data) != count * size:
            raise OSError(f"{uri}: truncated shard (images {first}..{first + count - 1})")
        keep = np.asarray(json.loads(str(batch["train"][i])), dtype=bool)
        images.append(np.frombuffer(data, dtype=np.uint8).reshape(count, *shape)[keep])
        labels.append(np.asarray(json.loads(str(batch["labels"][i])), dtype=np.int64)[keep])
    return {"image": np.concatenate(images), "label": np.concatenate(labels)}


def train_dataset(cfg: Config, root: str):
    """The training split as a Ray Data dataset (see the module docstring)."""
    import ray.data
    from ray.data import RandomSeedConfig, TaskPoolStrategy

    from ganflow.artifacts import read_manifest

    ray.data.DataContext.get_current().enable_progress_bars = False  # one bar per operator per epoch
    items = chunks(cfg, root)
    shape = tuple(read_manifest(cfg.paths.prepared)["shape"])
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=cfg.train.seed, reseed_after_execution=True))
    # num_cpus=0: the training workers may hold every CPU (cpus_per_worker auto); a read is I/O
    # (without a cap, zero-CPU tasks start a worker process each, all at once)
    return ds.map_batches(
        read_chunks, fn_args=(shape,), batch_size=1, num_cpus=0, compute=TaskPoolStrategy(size=READ_TASKS)
    )


def data_config():
    """Ray Train's DataConfig for the ray_data ingest: blocks in order (one worker's batches
    are then the same every run)."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(execution_options=options)


class StreamedBatches:
    """A worker's side of the ray_data ingest: per epoch, its shard of the training images
    (``shard``: ``ray.train.get_dataset_shard("train")``) as float batches (B, C, H, W) in
    [-1, 1] with labels, augmented in the worker."""

    def __init__(self, shard: Any, seed: int, rank: int, batch_size: int, transform: Any):
        self.shard, self.seed, self.rank, self.batch_size = shard, seed, rank, batch_size
        self.transform = transform

    def epoch(self, epoch: int):
        import torch

        from ganflow.dataset import transform_seed

        seed = transform_seed(self.seed, self.rank, 0, epoch)
        if self.transform is not None:
            self.transform.set_random_seed(seed)
        for batch in self.shard.iter_batches(
            batch_size=self.batch_size,
            drop_last=True,
            batch_format="numpy",
            local_shuffle_buffer_size=SHUFFLE_BUFFER_BATCHES * self.batch_size,
            local_shuffle_seed=seed,
        ):
            images = batch["image"]  # (B, H, W, C) uint8
            if self.transform is not None:
                images = np.stack([self.transform(image=im)["image"].reshape(im.shape) for im in images])
            # Ray Data's zero-copy batches are read-only: torch wants a writable array (a uint8 copy)
            x = torch.from_numpy(np.require(images, requirements=["C", "W"])).permute(0, 3, 1, 2)
            yield x.float().div_(127.5).sub_(1.0), torch.from_numpy(np.asarray(batch["label"], dtype=np.int64))


def shipped_files(ingest: str) -> dict[str, tuple[str, ...] | None]:
    """What of paths.prepared / paths.encoder a worker on another node needs copied (None: all)."""
    if ingest == "ray_data":  # the images stream from storage: the small files only
        return {"prepared": (MANIFEST, LABELS, SPLIT), "encoder": None}
    return {"prepared": None, "encoder": None}


# ---------------------------------------------------------------------------------------------
# the local ingest on a node that does not see the driver's files: the inputs travel through
# Ray's object store (sent by the driver, unpacked by each worker's node)


SHIPPED_INPUTS = ("prepared", "encoder")  # paths.* folders every worker reads


def materialize_inputs(cfg: Config, inputs: dict[str, Any] | None) -> Config:
    """On the driver's node, the project's files are read in place. On any other node (which may
    not see them), the copies the driver put into the object store are unpacked once per node
    into a local cache, and the config points there."""
    import ray

    from ganflow.atomic import atomic_dir

    if not inputs or ray.get_runtime_context().get_node_id() == inputs["node_id"]:
        return cfg
    cache = Path(tempfile.gettempdir()) / "ganflow-inputs" / inputs["key"]
    if not cache.is_dir():
        try:
            with atomic_dir(cache) as tmp:
                for rel, payload in ray.get(inputs["files"]).items():
                    target = tmp / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(payload)
        except OSError:  # another worker of this node unpacked it first
            if not cache.is_dir():
                raise
    paths = cfg.paths.model_copy(update={name: cache / name for name in SHIPPED_INPUTS})
    moved = cfg.model_copy(update={"paths": paths})
    return moved


def input_files(cfg: Config, ingest: str = "local") -> dict[str, bytes]:
    """What a worker on a node that does not see this process's files gets: the prepared data
    (with the ray_data ingest its small files only: the images stream from storage) and the
    encoder, by their path under paths.prepared / paths.encoder."""
    files: dict[str, bytes] = {}
    for name, wanted in shipped_files(ingest).items():
        assert name in SHIPPED_INPUTS
        folder = getattr(cfg.paths, name)
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            if wanted is None or path.name in wanted:
                files[f"{name}/{path.relative_to(folder).as_posix()}"] = path.read_bytes()
    return files


def ship_inputs(cfg: Config, ingest: str = "local") -> dict[str, Any]:
    """input_files, put into Ray's object store once (see materialize_inputs)."""
    import ray

    from ganflow.atomic import named_sha256

    files = input_files(cfg, ingest)
    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "key": named_sha256(files)[:16],
        "files": ray.put(files),
    }


def worker_inputs(cfg: Config, ingest: str | None = None) -> dict[str, Any] | None:
    """ship_inputs where a worker may run on another node. None on the stage's own local Ray:
    its workers all read the project's files in place, and the object store never holds a copy
    of the data set (which cost the driver and the object store its size in memory each)."""
    from ganflow.raycluster import own_local_ray

    return None if own_local_ray() else ship_inputs(cfg, ingest or cfg.data.ingest)

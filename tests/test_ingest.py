"""The ray_data ingest: the train split streamed from the prepared shards through Ray Data, on a
real in-process Ray (the two-node test in test_training.py trains through it across nodes)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from ganflow.config import Config, from_dict, resolve_paths
from ganflow.data import prepare
from ganflow.dataset import PreparedDataset
from ganflow.ingest import CHUNK, chunks, data_config, input_files, shards_root, train_dataset


def make_cfg(root, **data) -> Config:
    return resolve_paths(from_dict({"data": {"source": "digits", "image_size": 16, **data}}), root)


def rows(images: np.ndarray) -> list[str]:
    return [hashlib.sha256(im.tobytes()).hexdigest() for im in images]


def epochs(ds, count: int) -> list[tuple[list[str], np.ndarray]]:
    """What one Ray Train worker sees in ``count`` epochs: ds split as Train splits it for a world
    of 1, with the execution options ganflow gives Train (ingest.data_config)."""
    ds.context.execution_options.preserve_order = True
    (shard,) = ds.streaming_split(1, equal=True)
    out = []
    for _ in range(count):
        images, labels = [], []
        for batch in shard.iter_batches(batch_size=None, batch_format="numpy"):
            images.append(batch["image"])
            labels.append(batch["label"])
        out.append((rows(np.concatenate(images)), np.concatenate(labels)))
    return out


@pytest.fixture(scope="module")
def local_ray():
    """An in-process local Ray with the settings a stage's own Ray gets (RAY_ENV_DEFAULTS: above all
    RAY_worker_niceness 0; at Ray's nice 15 Ray Data's coordinator actor took 50 s to start
    beside two busy loops, against 2 s idle)."""
    import ray

    from tests.conftest import use_ray_settings

    with pytest.MonkeyPatch.context() as env:
        use_ray_settings(env)
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


def test_ray_data_streams_the_train_split_reshuffled_each_epoch_reproducibly(tmp_path, local_ray):
    assert data_config()._resolve_execution_options("train").preserve_order
    cfg = make_cfg(tmp_path, shard_mb=0.1)  # 5 shards of up to 409 images, chunks of CHUNK
    prepare(cfg)
    train = PreparedDataset(cfg.paths.prepared, part="train")
    images, labels = train.tensors()
    expected = sorted(rows(train.images.read_many(train.indices)))

    root = shards_root(cfg)  # one node: the prepared folder itself, nothing copied
    assert root == str(cfg.paths.prepared.resolve())
    items = chunks(cfg, root)
    assert all(item["count"] <= CHUNK for item in items) and sum(item["count"] for item in items) >= len(train)

    (first, first_labels), (second, _) = epochs(train_dataset(cfg, root), 2)
    # every training image once per epoch, with its label, and no held-out image
    assert sorted(first) == sorted(second) == expected
    by_row = dict(zip(rows(train.images.read_many(train.indices)), train.labels))
    assert [by_row[r] for r in first] == first_labels.tolist()
    # another order each epoch, the same first order in another run with the same train.seed
    assert first != second
    ((again, _),) = epochs(train_dataset(cfg, root), 1)
    assert again == first


def test_workers_on_other_nodes_get_no_images_with_ray_data(tmp_path):
    cfg = make_cfg(tmp_path, shard_mb=0.1)
    prepare(cfg)
    (cfg.paths.encoder).mkdir(parents=True)
    (cfg.paths.encoder / "encoder.json").write_text("{}")
    local = input_files(cfg, "local")
    streamed = input_files(cfg, "ray_data")
    assert {k for k in local if k.startswith("prepared/images-")} == {f"prepared/images-{i:05d}.npy" for i in range(5)}
    assert set(streamed) == {
        "prepared/manifest.json",
        "prepared/labels.npy",
        "prepared/split.npy",
        "encoder/encoder.json",
    }
    assert sum(map(len, streamed.values())) < 0.05 * sum(map(len, local.values()))


OWN_RAY = """
import sys
from ganflow.config import load_config
from ganflow.ingest import worker_inputs
from ganflow.raycluster import init_ray
cfg = load_config(sys.argv[1])
init_ray()  # no RAY_ADDRESS: the stage's own local Ray
print("inputs:", worker_inputs(cfg), worker_inputs(cfg, "local"))
"""


@pytest.mark.slow
def test_the_stage_own_local_ray_gets_no_copy_of_the_data(tmp_path):
    """On the local Ray a stage starts, every worker reads the project's files in place: nothing
    is read into the driver or put into the object store (the two-node test covers shipping)."""
    import os
    import subprocess
    import sys

    import yaml

    cfg = make_cfg(tmp_path, shard_mb=0.1)
    prepare(cfg)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"source": "digits", "image_size": 16, "shard_mb": 0.1}}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-c", OWN_RAY, str(params)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "inputs: None None" in proc.stdout

"""The prepare stage's sources, its guarantees (determinism, atomic output) and the loader."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import ganflow.data as data_mod
from ganflow.artifacts import read_manifest
from ganflow.atomic import file_sha256
from ganflow.config import from_dict, resolve_paths
from ganflow.data import prepare
from ganflow.dataset import PreparedDataset, TransformSeeder, build_train_transform, load_images
from ganflow.errors import DataError
from tests.conftest import REPO, run


def make_cfg(root: Path, **data):
    return resolve_paths(from_dict({"data": data}), root)


def folder_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def save(path: Path, image: Image.Image, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kw)


def gradient(w: int, h: int) -> np.ndarray:
    return (np.add.outer(np.arange(h), np.arange(w)) * 255 // max(1, w + h - 2)).astype(np.uint8)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Two classes of valid images in every mode and size, plus unreadable files."""
    root = tmp_path / "images"
    g = gradient(40, 30)
    save(root / "cats" / "rgb.png", Image.fromarray(np.stack([g, g[::-1], 255 - g], -1)))
    save(root / "cats" / "gray.jpg", Image.fromarray(g), quality=95)
    save(root / "cats" / "rgba.webp", Image.fromarray(np.dstack([g, g, g, g])))
    save(root / "cats" / "pal.bmp", Image.fromarray(g).convert("P"))
    save(root / "dogs" / "wide.png", Image.fromarray(gradient(100, 20)))
    save(root / "dogs" / "deep" / "tiny.png", Image.fromarray(gradient(5, 7)))
    save(root / "dogs" / "sixteen.png", Image.fromarray(gradient(24, 24).astype(np.uint16) * 200))
    save(root / "dogs" / "trans.png", Image.fromarray(g).convert("P"), transparency=0)
    # unreadable: truncated PNG, zero bytes, text with an image extension, and a non-image file
    full = root / "dogs" / "whole.png"
    save(full, Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    (root / "dogs" / "truncated.png").write_bytes(full.read_bytes()[:200])
    full.unlink()
    (root / "cats" / "empty.png").write_bytes(b"")
    (root / "cats" / "fake.jpg").write_text("this is not a jpeg")
    (root / "cats" / "notes.txt").write_text("labelled by folder")
    (root / ".DS_Store").write_bytes(b"\0\1")  # hidden files are ignored entirely
    return root


def test_digits_source(tmp_path):
    summary = prepare(make_cfg(tmp_path, source="digits", image_size=16))
    manifest = read_manifest(summary.path)
    images = load_images(summary.path)
    labels = np.load(summary.path / "labels.npy")
    assert images.shape == (1797, 16, 16, 1) and images.dtype == np.uint8
    assert images.max() > 200 and images.min() == 0  # 0..16 scaled to 0..255
    assert sorted(np.unique(labels)) == list(range(10))
    assert manifest["count"] == 1797 and manifest["class_names"] == [str(i) for i in range(10)]
    assert sum(manifest["class_counts"].values()) == 1797
    assert manifest["params"]["image_size"] == 16 and manifest["params"]["path"] is None


def test_three_way_split_is_stratified_deterministic_and_recorded(tmp_path):
    summary = prepare(make_cfg(tmp_path, source="digits", image_size=16, validation_fraction=0.2, test_fraction=0.1))
    manifest = read_manifest(summary.path)
    labels = np.load(summary.path / "labels.npy")
    split = np.load(summary.path / "split.npy")
    counts = np.bincount(labels, minlength=10)
    val, test = (np.bincount(labels[split == v], minlength=10) for v in (1, 2))
    assert np.array_equal(val, np.rint(0.2 * counts).astype(int))  # 20 % of every class
    assert np.array_equal(test, np.rint(0.1 * counts).astype(int))  # 10 % of every class
    assert manifest["split"]["validation"] == val.sum() and manifest["split"]["test"] == test.sum()
    assert manifest["split"]["train"] == 1797 - val.sum() - test.sum()
    assert manifest["split"]["test_class_counts"] == {str(k): int(test[k]) for k in range(10)}
    assert manifest["files"]["split.npy"] == file_sha256(summary.path / "split.npy")
    # the parts are disjoint and cover the data
    parts = [PreparedDataset(summary.path, part=p) for p in ("train", "validation", "test")]
    assert sum(len(p) for p in parts) == 1797
    assert len(set().union(*(set(p.indices) for p in parts))) == 1797
    assert np.array_equal(parts[2].labels, labels[split == 2])
    # deterministic: another folder, the same split; another fraction, another split
    again = prepare(
        make_cfg(tmp_path / "again", source="digits", image_size=16, validation_fraction=0.2, test_fraction=0.1)
    )
    assert np.array_equal(np.load(again.path / "split.npy"), split)
    other = prepare(
        make_cfg(tmp_path / "other", source="digits", image_size=16, validation_fraction=0.1, test_fraction=0.1)
    )
    assert (np.load(other.path / "split.npy") == 1).sum() < val.sum()


def test_a_tiny_class_keeps_one_image_on_every_side():
    from ganflow.data import three_way_split

    split = three_way_split(np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]), 0.15, 0.15)
    assert sorted(split[:3]) == [0, 1, 2]  # 3 images: one each, though 15 % rounds to 0
    assert (split[3:] == 0).sum() >= 1 and (split[3:] == 1).sum() == 2 and (split[3:] == 2).sum() == 2


def test_digits_in_rgb(tmp_path):
    summary = prepare(make_cfg(tmp_path, source="digits", channels=3, image_size=16))
    images = load_images(summary.path)
    assert images.shape == (1797, 16, 16, 3)
    assert np.array_equal(images[..., 0], images[..., 2])


@pytest.mark.parametrize("resize", ["crop", "pad", "stretch"])
def test_folder_source_labelled_with_skips(tmp_path, image_folder, resize):
    cfg = make_cfg(
        tmp_path,
        source="folder",
        path=str(image_folder),
        channels=3,
        image_size=16,
        resize=resize,
        max_bad_fraction=0.5,
    )
    summary = prepare(cfg)
    manifest = read_manifest(summary.path)
    images = load_images(summary.path)
    labels = np.load(summary.path / "labels.npy")
    assert images.shape == (8, 16, 16, 3)
    assert manifest["class_names"] == ["cats", "dogs"]
    assert manifest["class_counts"] == {"cats": 4, "dogs": 4}
    assert list(labels) == [0, 0, 0, 0, 1, 1, 1, 1]
    skipped = {s["file"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"cats/empty.png", "cats/fake.jpg", "cats/notes.txt", "dogs/truncated.png"}
    assert skipped["cats/notes.txt"] == "not an image file"
    assert skipped["cats/empty.png"] == "empty file"
    assert "corrupt" in skipped["dogs/truncated.png"] or "not a readable" in skipped["dogs/truncated.png"]
    assert manifest["skipped_count"] == 4 and manifest["files_total"] == 12
    if resize == "pad":  # the 100x20 image is letterboxed: black rows top and bottom
        wide = images[list(labels).index(1) + 2]  # dogs/ sorted: deep/tiny, sixteen, trans, wide
        assert wide[0].max() == 0 and wide[8].max() > 0


def test_folder_too_many_unreadable_fails(tmp_path, image_folder):
    cfg = make_cfg(tmp_path, source="folder", path=str(image_folder))  # default max_bad_fraction 0.1
    with pytest.raises(DataError) as info:
        prepare(cfg)
    message = str(info.value)
    assert "3 of 11 image files" in message and "data.max_bad_fraction=0.1" in message
    assert "\n" not in message
    assert not cfg.paths.prepared.exists()


def test_flat_folder_is_unlabelled_and_grayscale(tmp_path):
    root = tmp_path / "flat"
    for i in range(3):
        save(root / f"{i}.png", Image.fromarray(np.full((20, 20, 3), 60 * i, np.uint8)))
    summary = prepare(make_cfg(tmp_path, source="folder", path=str(root), image_size=16))
    manifest = read_manifest(summary.path)
    assert manifest["labelled"] is False and manifest["class_names"] == []
    assert list(np.load(summary.path / "labels.npy")) == [-1, -1, -1]
    assert load_images(summary.path).shape == (3, 16, 16, 1)


def test_huge_image_is_skipped(tmp_path):
    root = tmp_path / "huge"
    save(root / "ok.png", Image.fromarray(gradient(32, 32)))
    save(root / "big.png", Image.fromarray(np.zeros((300, 400), np.uint8)))
    cfg = make_cfg(tmp_path, source="folder", path=str(root), max_image_pixels=50_000, max_bad_fraction=0.5)
    manifest = read_manifest(prepare(cfg).path)
    assert manifest["count"] == 1
    assert manifest["skipped"] == [{"file": "big.png", "reason": "400x300 is more than data.max_image_pixels=50000"}]


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: None, "folder not found"),
        (lambda root: root.mkdir(), "folder is empty"),
        (lambda root: (root.mkdir(), (root / "a.txt").write_text("x")), "no image files"),
        (lambda root: (root.mkdir(), (root / "a.png").write_bytes(b"")), "no usable images"),
        (
            lambda root: (
                save(root / "top.png", Image.fromarray(gradient(8, 8))),
                save(root / "cls" / "a.png", Image.fromarray(gradient(8, 8))),
            ),
            "mixes class subfolders",
        ),
    ],
)
def test_unusable_folders(tmp_path, setup, message):
    root = tmp_path / "in"
    setup(root)
    with pytest.raises(DataError, match=message):
        prepare(make_cfg(tmp_path, source="folder", path=str(root)))


def test_npz_source(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 20, 24, 3), dtype=np.uint8)
    np.savez(tmp_path / "arr.npz", images=images, labels=np.array([7, 5, 7, 5, 5, 7]))
    summary = prepare(make_cfg(tmp_path, source="npz", path="arr.npz", image_size=16))
    manifest = read_manifest(summary.path)
    assert load_images(summary.path).shape == (6, 16, 16, 1)
    assert manifest["class_names"] == ["5", "7"]
    assert list(np.load(summary.path / "labels.npy")) == [1, 0, 1, 0, 0, 1]
    assert manifest["params"]["path"] == "arr.npz"  # relative to the project, not this machine


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 8, 8), np.float32))
    with pytest.raises(DataError, match="'images' must be uint8, got float32"):
        prepare(make_cfg(tmp_path, source="npz", path="float.npz"))
    np.savez(tmp_path / "none.npz", pixels=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(DataError, match="no 'images' array"):
        prepare(make_cfg(tmp_path, source="npz", path="none.npz"))
    (tmp_path / "junk.npz").write_text("junk")
    with pytest.raises(DataError, match="not a readable .npz"):
        prepare(make_cfg(tmp_path, source="npz", path="junk.npz"))


def test_same_input_same_bytes(tmp_path, image_folder):
    cfg = make_cfg(tmp_path, source="folder", path=str(image_folder), max_bad_fraction=0.5)
    first = folder_bytes(prepare(cfg).path)
    second = folder_bytes(prepare(cfg).path)
    assert first == second and set(first) == {"images-00000.npy", "labels.npy", "split.npy", "manifest.json"}
    digits = make_cfg(tmp_path / "d", source="digits")
    assert folder_bytes(prepare(digits).path) == folder_bytes(prepare(digits).path)


def test_images_are_written_in_shards_a_reader_reads_back(tmp_path):
    """data.shard_mb splits the images into shards of a bounded size; the dataset a reader sees
    is the same images whatever the sharding, the manifest lists and hashes every shard, and the
    same input and params give the same bytes."""
    one = prepare(make_cfg(tmp_path / "one", source="digits", image_size=16))
    sharded_cfg = make_cfg(tmp_path / "many", source="digits", image_size=16, shard_mb=0.1)
    many = prepare(sharded_cfg)
    manifest = read_manifest(many.path)
    per_shard = int(0.1 * 2**20) // (16 * 16)  # 409 images of 256 bytes
    assert [s["count"] for s in manifest["shards"]] == [per_shard] * 4 + [1797 - 4 * per_shard]
    assert sorted(p.name for p in many.path.glob("images-*.npy")) == [f"images-{i:05d}.npy" for i in range(5)]
    assert all(manifest["files"][s["file"]] == file_sha256(many.path / s["file"]) for s in manifest["shards"])
    assert [s["file"] for s in read_manifest(one.path)["shards"]] == ["images-00000.npy"]
    assert np.array_equal(load_images(many.path), load_images(one.path))
    assert read_manifest(one.path)["images_sha256"] != manifest["images_sha256"]  # another layout, another hash
    for part in ("train", "validation", "test"):
        a, b = PreparedDataset(one.path, part=part), PreparedDataset(many.path, part=part)
        assert torch.equal(a.tensors()[0], b.tensors()[0])
        assert all(torch.equal(a[i][0], b[i][0]) for i in {0, len(a) // 2, len(a) - 1})
    # a reader crosses process boundaries (DataLoader workers): it reopens its files there
    reader = pickle.loads(pickle.dumps(PreparedDataset(many.path, part="train")))
    assert torch.equal(reader[per_shard][0], PreparedDataset(one.path, part="train")[per_shard][0])
    assert folder_bytes(prepare(sharded_cfg).path) == folder_bytes(many.path)


def test_a_shard_that_disagrees_with_the_manifest_is_refused(tmp_path):
    summary = prepare(make_cfg(tmp_path, source="digits", image_size=16, shard_mb=0.1))
    shard = summary.path / "images-00001.npy"
    np.save(shard, np.load(shard)[:-1])  # one image short
    with pytest.raises(DataError, match="images-00001.npy: holds uint8 \\(408, 16, 16, 1\\), the manifest says"):
        PreparedDataset(summary.path, part="all")
    shard.write_bytes(b"junk")
    with pytest.raises(DataError, match="images-00001.npy: not a readable shard"):
        PreparedDataset(summary.path, part="all")


def many_shards(image_folder: Path) -> dict:
    """image_folder grown to 24 shard ranges of 10 files: 200 more images, one broken among them,
    and 25 junk files at the end, so that the last two ranges have no usable image. Returns the
    data params that read it."""
    rng = np.random.default_rng(1)
    for i in range(200):
        save(
            image_folder / ("cats", "dogs")[i % 2] / f"n{i:03d}.png",
            Image.fromarray(rng.integers(0, 255, (int(rng.integers(8, 40)), 33, 3), dtype=np.uint8)),
        )
    (image_folder / "cats" / "n100.png").write_bytes(b"\x89PNG broken")
    for i in range(25):  # the folder's last files, the last two shard ranges only these: no shard for
        (image_folder / "dogs" / f"z{i:02d}.png").write_bytes(b"junk")  # them, and no gap in the names
    return dict(
        source="folder",
        path=str(image_folder),
        max_bad_fraction=0.5,
        channels=3,
        image_size=16,
        shard_mb=10 * 16 * 16 * 3 / 2**20,
    )  # 10 images per shard


def test_parallel_decoding_writes_the_same_bytes(tmp_path, image_folder):
    """The folder decoded by worker processes and the stage together (many shards, the broken
    files among them, a shard range with no usable image) gives the very bytes of the in-process
    decode: images, labels, split, and the skipped-file report."""
    common = many_shards(image_folder)
    one = make_cfg(tmp_path / "one", prepare_workers=0, **common)
    two = make_cfg(tmp_path / "two", prepare_workers=2, **common)
    ranges = data_mod.shard_ranges(len(data_mod._folder_files(image_folder)), two.data)
    assert len(ranges) == 24 and data_mod.prepare_processes(two.data, len(ranges)) == 2
    serial, parallel = folder_bytes(prepare(one).path), folder_bytes(prepare(two).path)
    assert serial == parallel
    manifest = json.loads(parallel["manifest.json"])
    assert manifest["count"] == 8 + 200 - 1
    assert [s["file"] for s in manifest["shards"]] == [f"images-{k:05d}.npy" for k in range(len(ranges) - 2)]
    assert {"file": "cats/n100.png", "reason": "not a readable image"} in manifest["skipped"]
    assert not [name for name in parallel if name.startswith(".part")]


RAY_DECODE_MISSING = """
import sys
from ganflow.config import from_dict
from ganflow.data import _run_shard_tasks_on_ray
from ganflow.errors import DataError
try:
    _run_shard_tasks_on_ray([(sys.argv[1], ["a.png"], sys.argv[1] + ".npy")], from_dict({}).data, print)
except DataError as exc:
    print("error:", exc)
"""


@pytest.mark.slow
def test_a_ray_cluster_decodes_the_folder_on_its_nodes(tmp_path, image_folder, two_nodes):
    """On a Ray cluster (RAY_ADDRESS set, as for every Ray job's driver: how prepare runs when
    cluster.address is set) the shard ranges are Ray tasks spread over the nodes, and the stage
    writes what they return: the very bytes of a local prepare."""
    cluster, _ = two_nodes
    common = many_shards(image_folder)
    local = folder_bytes(prepare(make_cfg(tmp_path / "local", prepare_workers=0, **common)).path)
    root = tmp_path / "on-ray"
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump({"data": common}))
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    proc = run(
        ["python", str(REPO / "pipelines" / "prepare.py"), "--params", "params.yaml"], root, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "prepare: decoded 24 shards with Ray tasks on 2 node(s) of the cluster" in proc.stderr
    assert folder_bytes(root / "data" / "prepared") == local

    # a node that cannot read data.path: the task's reason in one line
    proc = run(["python", "-c", RAY_DECODE_MISSING, str(tmp_path / "nowhere")], root, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    error = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "on the Ray cluster failed: [Errno 2] No such file or directory" in error[0], proc.stdout


PREPARE_SOON_NOTICE = """
import runpy, sys
import ganflow.data
ganflow.data.NO_CPU_NOTICE_S = 0.5  # the notice after half a second, not 30
sys.argv = [sys.argv[1], "--params", "params.yaml"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.ray
def test_prepare_on_a_ray_cluster_without_cpus_says_it_waits_for_a_node(tmp_path, image_folder, monkeypatch):
    """A head with num-cpus 0 (infra/ray's) and no worker yet: the decoding tasks wait for the
    autoscaler. The stage says so instead of hanging silently, and goes on when a node joins.
    (The stage runs in a process of its own: this one may hold a Ray of an earlier test.)"""
    import subprocess
    import threading

    from ray.cluster_utils import Cluster

    from tests.conftest import BIN, use_ray_settings

    use_ray_settings(monkeypatch)
    root = tmp_path / "on-ray"
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump({"data": many_shards(image_folder)}))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    proc = None
    try:
        proc = subprocess.Popen(
            [str(BIN / "python"), "-c", PREPARE_SOON_NOTICE, str(REPO / "pipelines" / "prepare.py")],
            cwd=root,
            env={**os.environ, "RAY_ADDRESS": cluster.address},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines: list[str] = []
        notice = threading.Event()

        def read() -> None:
            for line in proc.stdout:
                lines.append(line)
                if "has no CPU for the decoding tasks yet" in line:
                    notice.set()
            notice.set()  # the stage ended: nothing more to wait for

        threading.Thread(target=read, daemon=True).start()
        notice.wait(600)
        assert proc.poll() is None, "".join(lines)[-3000:]  # still waiting for a CPU
        assert any(
            line.startswith("prepare: the Ray cluster has no CPU for the decoding tasks yet; waiting for a node")
            for line in lines
        ), "".join(lines)[-3000:]
        cluster.add_node(num_cpus=1)
        assert proc.wait(600) == 0, "".join(lines)[-3000:]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        cluster.shutdown()
    output = "".join(lines)
    assert "prepare: decoded 24 shards with Ray tasks on 1 node(s) of the cluster" in output
    assert read_manifest(root / "data" / "prepared")["count"] == 8 + 199, output[-3000:]


def test_a_job_server_address_in_ray_address_keeps_prepare_on_this_machine(tmp_path, image_folder, monkeypatch):
    """RAY_ADDRESS=http://HEAD:8265 is what `ray job` commands read: not a cluster to decode on."""
    from ganflow.raycluster import on_ray_cluster

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")
    assert not on_ray_cluster()
    summary = prepare(make_cfg(tmp_path, source="folder", path=str(image_folder), max_bad_fraction=0.5))
    assert summary.count == 8
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert on_ray_cluster()


def test_prepare_workers_resolve_to_the_cores_and_the_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod.os, "cpu_count", lambda: 4)
    auto = make_cfg(tmp_path, source="folder").data
    assert data_mod.prepare_processes(auto, 10) == 3  # the stage decodes too: one process per core in all
    assert data_mod.prepare_processes(auto, 2) == 1  # no idle process
    assert data_mod.prepare_processes(auto, 1) == 0  # one shard: no pool to start
    with pytest.raises(Exception, match="prepare_workers"):
        make_cfg(tmp_path, prepare_workers=-1)


def test_changed_input_changes_the_hash(tmp_path, image_folder):
    cfg = make_cfg(tmp_path, source="folder", path=str(image_folder), max_bad_fraction=0.5)
    before = read_manifest(prepare(cfg).path)["source_hash"]
    save(image_folder / "cats" / "new.png", Image.fromarray(gradient(9, 9)))
    assert read_manifest(prepare(cfg).path)["source_hash"] != before


@pytest.mark.parametrize("interrupt", [OSError("disk full"), KeyboardInterrupt()])
def test_interrupted_write_keeps_the_previous_output(tmp_path, monkeypatch, interrupt):
    cfg = make_cfg(tmp_path, source="digits", image_size=16)
    before = folder_bytes(prepare(cfg).path)
    real_save = data_mod._save_npy

    def failing_save(path, array):
        if path.name == "labels.npy":  # the image shard is already written
            raise interrupt
        real_save(path, array)

    monkeypatch.setattr(data_mod, "_save_npy", failing_save)
    with pytest.raises(type(interrupt)):
        prepare(make_cfg(tmp_path, source="digits", image_size=32))
    assert folder_bytes(cfg.paths.prepared) == before
    assert sorted(p.name for p in cfg.paths.prepared.parent.iterdir()) == ["prepared"]  # no temp left


def test_prepare_stage_cli_errors(tmp_path):
    """The stage entry point: one error line, exit 1, the earlier output untouched."""
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  source: digits\n  image_size: 16\n")
    ok = run(["python", str(REPO / "pipelines" / "prepare.py"), "--params", str(params)], cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "prepared 1797 images (16x16x1, 10 classes)" in ok.stdout
    before = folder_bytes(tmp_path / "data" / "prepared")

    (tmp_path / "empty").mkdir()
    params.write_text("data:\n  source: folder\n  path: empty\n")
    bad = run(["python", str(REPO / "pipelines" / "prepare.py"), "--params", str(params)], cwd=tmp_path)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [f"error: data.path: folder is empty: {tmp_path / 'empty'}"]
    assert folder_bytes(tmp_path / "data" / "prepared") == before

    params.write_text("data:\n  image_size: 20\n")
    bad = run(["python", str(REPO / "pipelines" / "prepare.py"), "--params", str(params)], cwd=tmp_path)
    assert bad.returncode == 2 and "data.image_size: must be a power of two" in bad.stderr


# --------------------------------------------------------------------------------------------- loader


@pytest.fixture
def half_white(tmp_path) -> Path:
    """24 images whose left half is white: a horizontal flip is visible in pixel (0, 0)."""
    images = np.zeros((24, 16, 16, 1), np.uint8)
    images[:, :, :8] = 255
    np.savez(tmp_path / "half.npz", images=images, labels=np.arange(24) % 3)
    return prepare(make_cfg(tmp_path, source="npz", path="half.npz", image_size=16)).path


def test_loader_values_and_shapes(tmp_path):
    path = prepare(make_cfg(tmp_path, source="digits", image_size=16)).path
    dataset = PreparedDataset(path, part="all")
    x, y = dataset[5]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    batch = torch.stack([dataset[i][0] for i in range(200)])
    assert batch.min() == -1.0 and batch.max() == 1.0  # 0 -> -1, 255 -> 1
    assert y == 5 and dataset.num_classes == 10 and len(dataset) == 1797


def flips(dataset: PreparedDataset, seeder: TransformSeeder, workers: int, epoch: int = 0) -> list[bool]:
    seeder.start_epoch(epoch, dataset)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=1, num_workers=workers, worker_init_fn=seeder if workers else None
    )
    return [bool(x[0, 0, 0, 0] < 0) for x, _ in loader]  # white pixel (0, 0) went dark: flipped


def test_each_worker_and_rank_gets_its_own_augmentation_stream(half_white):
    cfg_data = make_cfg(half_white.parent, hflip=0.5).data
    dataset = PreparedDataset(half_white, build_train_transform(cfg_data), part="all")
    seq = flips(dataset, TransformSeeder(seed=3, rank=0), workers=2)
    assert 0 < sum(seq) < len(seq)
    # batches alternate between the two workers; without reseeding both draw the same stream
    assert seq[0::2] != seq[1::2]
    # reproducible for the same (seed, rank), different for another rank and another epoch
    assert flips(dataset, TransformSeeder(seed=3, rank=0), workers=2) == seq
    assert flips(dataset, TransformSeeder(seed=3, rank=1), workers=2) != seq
    assert flips(dataset, TransformSeeder(seed=3, rank=0), workers=2, epoch=1) != seq
    in_process = flips(dataset, TransformSeeder(seed=3, rank=0), workers=0)
    assert in_process == flips(dataset, TransformSeeder(seed=3, rank=0), workers=0)
    assert in_process != flips(dataset, TransformSeeder(seed=3, rank=1), workers=0)


def test_loader_refuses_a_missing_dataset(tmp_path):
    with pytest.raises(DataError, match="run `dvc repro prepare`"):
        PreparedDataset(tmp_path / "nothing", part="all")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DataError, match="format 'other'"):
        PreparedDataset(tmp_path / "bad", part="all")

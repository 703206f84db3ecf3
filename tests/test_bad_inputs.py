"""Bad inputs, tried for real: the stages as subprocesses on broken images, odd folders, bad
params, a missing model and unusable storage. Each is refused with one line on stderr
(`error: ...` naming the bad thing), a non-zero exit, no traceback, no hang, and an earlier
good output left byte for byte as it was.

What tests/test_config.py and tests/test_data.py already assert in-process (every config error's
wording, each unreadable-file reason, empty folders) is not repeated here.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ganflow.artifacts import read_manifest
from ganflow.atomic import check_storage_writable, check_writable_dir
from ganflow.config import from_dict, load_config, resolve_paths
from ganflow.data import decode_image, prepare
from ganflow.dataset import load_images
from ganflow.errors import GanflowError
from tests.conftest import REPO, run

PREPARE = REPO / "pipelines" / "prepare.py"
ENCODER = REPO / "pipelines" / "encoder.py"


def stage(script: Path, params: Path, timeout: float = 120):
    return run([sys.executable, str(script), "--params", str(params)], cwd=params.parent, timeout=timeout)


def one_error_line(proc, *names: str, code: int | None = None) -> str:
    """The single `error:` line of a failed run, checked to name each of ``names``."""
    assert proc.returncode != 0, proc.stdout
    if code is not None:
        assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def gradient(w: int = 20, h: int = 20) -> np.ndarray:
    return (np.add.outer(np.arange(h), np.arange(w)) * 255 // (w + h - 2)).astype(np.uint8)


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def writable(directory: Path) -> bool:
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def write_params(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


# ------------------------------------------------------------------------------- the prepare stage


def test_prepare_stage_refuses_each_bad_input_and_keeps_the_earlier_output(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    for i in range(4):
        Image.fromarray(np.roll(gradient(), i, axis=1)).save(good / f"{i}.png")
    ok = stage(
        PREPARE, write_params(tmp_path / "params.yaml", data={"source": "folder", "path": "good", "image_size": 16})
    )
    assert ok.returncode == 0, ok.stderr
    prepared = tmp_path / "data" / "prepared"
    before = tree_bytes(prepared)

    folders = {name: tmp_path / name for name in ("broken", "mostly_bad", "no_images", "bomb")}
    for folder in folders.values():
        folder.mkdir()
    full = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    full.save(tmp_path / "whole.png")
    png = (tmp_path / "whole.png").read_bytes()
    (folders["broken"] / "truncated.png").write_bytes(png[: len(png) // 3])
    (folders["broken"] / "zero.png").write_bytes(b"")
    (folders["broken"] / "text.jpg").write_text("not a jpeg at all")
    for i in range(2):
        Image.fromarray(gradient()).save(folders["mostly_bad"] / f"ok{i}.png")
        (folders["mostly_bad"] / f"bad{i}.webp").write_bytes(b"RIFF\0\0\0\0WEBPjunk")
    (folders["no_images"] / "readme.txt").write_text("images went elsewhere")
    (folders["no_images"] / "data.csv").write_text("a,b\n")
    (folders["bomb"] / "bomb.png").write_bytes(png_header_only(30_000, 30_000))  # 900 Mpx claimed, 100 bytes

    data = {"source": "folder", "image_size": 16}
    cases = {  # params -> (exit code, what the error line must name)
        "broken": (
            {"data": {**data, "path": "broken"}},
            1,
            ["no usable images", "truncated.png", "zero.png (empty file)", "text.jpg (not a readable image)"],
        ),
        "mostly_bad": (
            {"data": {**data, "path": "mostly_bad"}},
            1,
            ["2 of 4 image files", "data.max_bad_fraction=0.1", "bad0.webp"],
        ),
        "no_images": ({"data": {**data, "path": "no_images"}}, 1, ["no image files", "(2 other files)"]),
        "bomb": ({"data": {**data, "path": "bomb"}}, 1, ["no usable images", "bomb.png (more than"]),
        "unknown_key": ({"data": {**data, "path": "good", "sourse": "folder"}}, 2, ["data.sourse: unknown key"]),
        "lr_zero": ({"data": {**data, "path": "good"}, "train": {"lr_g": 0}}, 2, ["train.lr_g: must be > 0"]),
        # prepare as a Ray job: its nodes do not have the project's data folder (refused before
        # any connection: nothing listens at this address)
        "in_project_for_a_job": (
            {
                "data": {**data, "path": "good"},
                "cluster": {"address": "http://127.0.0.1:9", "storage_path": str(tmp_path)},
            },
            1,
            ["data.path: good is relative to the project", "http://127.0.0.1:9", "absolute path"],
        ),
    }
    params = {name: write_params(tmp_path / f"{name}.yaml", **values) for name, (values, _, _) in cases.items()}
    with ThreadPoolExecutor(2) as pool:  # two at a time, all against the same earlier output
        procs = dict(zip(params, pool.map(lambda p: stage(PREPARE, p, timeout=300), params.values())))
    for name, (_, code, names) in cases.items():
        one_error_line(procs[name], *names, code=code)
    assert tree_bytes(prepared) == before
    assert sorted(p.name for p in prepared.parent.iterdir()) == ["prepared"]  # no temporary left


def test_one_image_prepares_then_the_encoder_stage_refuses_it(tmp_path):
    (tmp_path / "one").mkdir()
    Image.fromarray(gradient()).save(tmp_path / "one" / "only.png")
    params = write_params(tmp_path / "params.yaml", data={"source": "folder", "path": "one", "image_size": 16})
    summary = prepare(load_config(params))
    assert summary.count == 1 and summary.skipped == 0
    proc = stage(ENCODER, params)
    one_error_line(
        proc, str(tmp_path / "data" / "prepared"), "1 training images are too few to fit an encoder (need 8)", code=1
    )
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("channels", [1, 3])
def test_mixed_image_modes_in_one_folder_give_the_same_pixels(tmp_path, channels):
    """Gray, RGB, RGBA, LA and palette files of one picture prepare to identical arrays;
    transparency is black."""
    g = gradient(16, 16)
    root = tmp_path / "mixed"
    root.mkdir()
    opaque = np.full_like(g, 255)
    Image.fromarray(g).save(root / "a_gray.png")
    Image.fromarray(np.dstack([g, g, g])).save(root / "b_rgb.png")
    Image.fromarray(np.dstack([g, g, g, opaque])).save(root / "c_rgba.png")
    Image.fromarray(np.dstack([g, g, g, opaque])).convert("LA").save(root / "d_la.png")
    Image.fromarray(g).convert("P").save(root / "e_palette.png")
    Image.fromarray(g).convert("P").save(root / "f_palette.gif")  # not an accepted extension: skipped
    Image.fromarray(np.dstack([g, g, g, np.zeros_like(g)])).save(root / "g_transparent.png")
    cfg = resolve_paths(
        from_dict({"data": {"source": "folder", "path": "mixed", "image_size": 16, "channels": channels}}), tmp_path
    )
    summary = prepare(cfg)
    images = load_images(summary.path)
    assert images.shape == (6, 16, 16, channels)
    expected = np.repeat(g[:, :, None], channels, axis=2)
    for i in range(5):
        assert np.array_equal(images[i], expected), i
    assert images[5].max() == 0  # fully transparent -> black
    assert [s["file"] for s in read_manifest(summary.path)["skipped"]] == ["f_palette.gif"]


def test_every_oversized_header_is_reported_as_too_many_pixels():
    for side in (8_000, 10_000, 30_000):  # 64, 100 and 900 Mpx, data.max_image_pixels = 50 M
        with pytest.raises(ValueError, match="pixels"):
            decode_image(png_header_only(side, side), channels=1, max_pixels=50_000_000)


# ------------------------------------------------------------------------------ training guards


def test_batch_larger_than_the_dataset_is_refused_before_ray(tmp_path):
    from ganflow.encoder import fit_encoder
    from ganflow.errors import TrainingError
    from ganflow.raytrain import check_trainable

    rng = np.random.default_rng(0)
    # 160 images, 24 for validation and 24 for test: 112 to train on
    np.savez(tmp_path / "small.npz", images=rng.integers(0, 256, (160, 16, 16), dtype=np.uint8))
    values = {
        "data": {"source": "npz", "path": "small.npz", "image_size": 16},
        "eval": {"num_samples": 10, "encoder_epochs": 1, "feature_dim": 8},
    }

    def cfg_with(batch_size: int, num_workers: int = 1):
        return resolve_paths(
            from_dict({**values, "train": {"batch_size": batch_size}, "cluster": {"num_workers": num_workers}}),
            tmp_path,
        )

    prepare(cfg_with(8))
    fit_encoder(cfg_with(8))
    assert check_trainable(cfg_with(112)) == 112  # one batch per epoch is still a training
    assert check_trainable(cfg_with(112, num_workers=2)) == 112  # 56 per rank, 56 images each
    with pytest.raises(TrainingError) as info:
        check_trainable(cfg_with(120))
    assert str(info.value) == (
        "train.batch_size: 120 is larger than the prepared dataset allows (112 training images over 1 worker(s))"
    )
    with pytest.raises(TrainingError, match=r"train\.batch_size: 114 .* \(112 training images over 2 worker\(s\)\)"):
        check_trainable(cfg_with(114, num_workers=2))


def test_too_small_a_validation_split_is_refused_with_the_key(tmp_path):
    from ganflow.encoder import EvaluationError, fit_encoder

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "small.npz", images=rng.integers(0, 256, (12, 16, 16), dtype=np.uint8))
    cfg = resolve_paths(
        from_dict(
            {
                "data": {
                    "source": "npz",
                    "path": "small.npz",
                    "image_size": 16,
                    "validation_fraction": 0.01,
                    "test_fraction": 0.1,
                },
                "eval": {"encoder_epochs": 1},
            }
        ),
        tmp_path,
    )
    prepare(cfg)  # 12 images: round(0.12) = 0 validation, but one kept on every side of a class of 3+
    manifest = json.loads((cfg.paths.prepared / "manifest.json").read_text())
    assert manifest["split"]["validation"] == 1
    with pytest.raises(EvaluationError) as info:
        fit_encoder(cfg)
    assert "the validation split has 1 images (need 2)" in str(info.value)
    assert "data.validation_fraction" in str(info.value)
    assert not cfg.paths.encoder.exists()


def test_unwritable_storage_is_refused_with_the_key(tmp_path):
    def cfg_with(storage_path):
        return resolve_paths(from_dict({"cluster": {"storage_path": storage_path}}), tmp_path)

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(GanflowError) as info:
        check_storage_writable(cfg_with(str(afile)))
    assert str(info.value) == f"cluster.storage_path: {afile} is a file, not a directory"
    with pytest.raises(GanflowError, match=f"cluster.storage_path: {afile / 'runs'} is under {afile}, which is a file"):
        check_storage_writable(cfg_with(str(afile / "runs")))
    # a read-only mount refuses even root (permission bits do not)
    if not writable(Path("/sys")):
        with pytest.raises(GanflowError, match=r"cluster.storage_path: /sys/ganflow-storage is not writable \(/sys"):
            check_storage_writable(cfg_with("/sys/ganflow-storage"))
    if os.geteuid() != 0:  # root writes through mode bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(GanflowError, match="is not writable"):
            check_writable_dir(locked / "ray", "cluster.storage_path")

    # fine: a URI (left to Ray), the default paths.ray_results, a directory to be made
    check_storage_writable(cfg_with("s3://bucket/ganflow"))
    check_storage_writable(cfg_with(None))
    check_storage_writable(cfg_with(str(tmp_path / "new" / "deeper")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] + (["locked"] if os.geteuid() else [])


# --------------------------------------------------------------------------------- ganflow sample


def test_sample_from_a_model_that_does_not_exist(tmp_path):
    """A models:/ URI that names nothing, against a fresh store, an empty store and a dead
    server: one line each, quickly, and no store created as a side effect."""
    from mlflow.tracking import MlflowClient

    fresh, empty = tmp_path / "fresh", tmp_path / "empty"
    for root in (fresh, empty):
        root.mkdir()
        (root / "params.yaml").write_text("data:\n  image_size: 16\n")
    MlflowClient(f"sqlite:///{empty / 'mlflow.db'}").search_experiments()  # creates the tables
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    commands = {
        "fresh": (fresh, ["--model", "models:/nope@champion"]),
        "empty": (empty, ["--model", "models:/nope@champion"]),
        "dead": (fresh, ["--model", "models:/nope@champion", "--tracking-uri", dead]),
    }

    def sample(item):
        cwd, args = item
        return run(
            ["ganflow", "sample", *args, "-n", "2", "--out", "x.npz", "--params", "params.yaml"], cwd=cwd, timeout=300
        )  # a hang fails here; how fast is not this test's business

    with ThreadPoolExecutor(2) as pool:
        procs = dict(zip(commands, pool.map(sample, commands.values())))
    prefix = "error: --model models:/nope@champion: cannot load"
    assert one_error_line(procs["fresh"], code=1) == f"{prefix} (no MLflow store at sqlite:///{fresh / 'mlflow.db'})"
    assert not (fresh / "mlflow.db").exists()
    assert one_error_line(procs["empty"], code=1) == f"{prefix} (Registered Model with name=nope not found)"
    one_error_line(procs["dead"], prefix, f"MLflow server at {dead} is unreachable", code=1)
    assert not any(p.name == "x.npz" for root in (fresh, empty) for p in root.iterdir())

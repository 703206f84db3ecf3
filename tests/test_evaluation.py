"""The evaluation protocol end to end on the digits (16 px, a short encoder): three splits each
with one job, a real baseline drawn like the samples with its spread, a copy detector that
verbatim, noisy, shifted and partial copies cannot pass and real held-out images do not trip,
and metrics a small split cannot support named instead of refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from ganflow.artifacts import SPLIT, TEST, read_manifest
from ganflow.config import from_dict, resolve_paths
from ganflow.data import prepare
from ganflow.dataset import PreparedDataset
from ganflow.encoder import EvaluationError, fit_encoder
from ganflow.evaluation import class_match, evaluate_generator, load_reference, score_images
from ganflow.report import reading, summary_line

TINY_EVAL = {"encoder_epochs": 4, "draws": 3, "kid_subsets": 5, "kid_subset_size": 100}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    cfg = resolve_paths(from_dict({"data": {"image_size": 16}, "eval": TINY_EVAL}), root)
    prepare(cfg)
    return cfg, fit_encoder(cfg)


def part(cfg, name: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, H, W, C) images and labels of one split."""
    data = PreparedDataset(cfg.paths.prepared, part=name)
    return data.images.read_many(data.indices), data.labels


def as_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def serving(images: np.ndarray, labels: np.ndarray | None = None):
    """A stand-in generator drawing from a fixed pool of images: for a conditional code, an image
    of the class asked for (each used once, in order)."""
    pools = {c: list(np.flatnonzero(labels == c)) for c in np.unique(labels)} if labels is not None else None
    state = {"at": 0}

    def sample(z: torch.Tensor) -> torch.Tensor:
        if pools is None or z.shape[1] <= 8:
            index = np.arange(state["at"], state["at"] + len(z)) % len(images)
            state["at"] += len(z)
        else:
            index = np.array(
                [pools[int(c)][(state["at"] + i) % len(pools[int(c)])] for i, c in enumerate(z[:, 8:].argmax(1))]
            )
            state["at"] += len(z)
        return as_tensor(images[index])

    return sample


META = {"latent_dim": 8, "class_prior": [0.1] * 10}


def test_prepare_splits_three_ways_stratified_and_deterministic(fitted, tmp_path):
    cfg, _ = fitted
    manifest = read_manifest(cfg.paths.prepared)
    split = manifest["split"]
    assert split["train"] + split["validation"] + split["test"] == 1797
    for name in manifest["class_names"]:  # every class on every side, ~15 % each held out
        total = manifest["class_counts"][name]
        for side in ("validation", "test"):
            assert abs(split[f"{side}_class_counts"][name] - 0.15 * total) <= 1
    assert manifest["files"][SPLIT]  # the split is recorded with its hash
    again = resolve_paths(from_dict({"data": {"image_size": 16}}), tmp_path)
    prepare(again)
    assert (again.paths.prepared / SPLIT).read_bytes() == (cfg.paths.prepared / SPLIT).read_bytes()


def test_the_encoder_stage_never_reads_the_test_split(fitted, tmp_path):
    """The test images replaced by noise: the encoder, its validation reference and its train
    features come out byte for byte the same."""
    cfg, _ = fitted
    sealed = resolve_paths(from_dict({"data": {"image_size": 16}, "eval": TINY_EVAL}), tmp_path)
    shutil.copytree(cfg.paths.prepared, sealed.paths.prepared)
    test = np.load(sealed.paths.prepared / SPLIT) == TEST
    shard = sealed.paths.prepared / "images-00000.npy"
    images = np.load(shard)
    assert len(images) == len(test)  # the digits are one shard
    images[test] = np.random.default_rng(0).integers(0, 256, images[test].shape, dtype=np.uint8)
    np.save(shard, images)
    fit_encoder(sealed)
    for name in ("encoder.safetensors", "reference.safetensors"):
        assert (sealed.paths.encoder / name).read_bytes() == (cfg.paths.encoder / name).read_bytes(), name


def test_unseen_real_images_score_at_the_real_baseline_and_are_not_flagged(fitted):
    """Validation images served as samples, scored on test: within the spread of the real baseline."""
    cfg, metrics = fitted
    assert metrics["kind"] == "classifier" and metrics["validation_accuracy"] > 0.7
    images, labels = part(cfg, "validation")
    reference = load_reference(cfg)
    # at k = 1 the draw is the test split's own class counts, which the validation split matches
    cfg_k1 = cfg.model_copy(deep=True)
    cfg_k1.eval.num_samples = reference.split.draw_size // 2
    m, samples = evaluate_generator(cfg_k1, serving(images, labels), META)
    assert samples.dtype == np.uint8 and samples.shape[1:] == (16, 16, 1)
    assert m["split"] == "test" and m["draws"] == 3 and m["validation"]["draws"] == 3
    assert m["fd_domain_sd"] >= 0 and m["real_fd_domain_sd"] > 0  # real draws differ
    assert (
        abs(m["fd_domain"] - m["real_fd_domain"])
        < 3 * np.hypot(m["fd_domain_sd"], m["real_fd_domain_sd"]) + 0.25 * m["real_fd_domain"]
    )
    assert m["copying_flagged"] == 0.0, m["copying_reasons"]
    assert m["classes_covered"] == 10 and m["class_match"] > 0.6
    assert m["kid_subset_size"] <= m["sample_size"] // 2 and m["kid_subset_size"] <= m["reference_size"] // 2
    # the pixel check agrees: real images' power spectrum is as close as the baseline's
    assert m["real_spectrum_gap_sd"] > 0 and "power spectrum is as close" in reading(m)
    # ... and so does diversity: unseen real images are as varied as the train draws
    for key in ("diversity_over_real", "diversity_pixel_over_real"):
        assert 0.85 < m[key] < 1.15, (key, m[key])
    assert "about as varied as real images" in reading(m) and "diversity" in summary_line(m)


def blur(images: np.ndarray) -> np.ndarray:
    """A 3 x 3 box blur (edges repeated) of uint8 (N, H, W, C)."""
    x = np.pad(images.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = images.shape[1:3]
    return np.rint(sum(x[:, i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9).astype(np.uint8)


@pytest.mark.parametrize("defect", ["blurred", "checkerboard"])
def test_the_power_spectrum_tells_blobs_and_patterns_the_encoder_may_miss(fitted, defect):
    """Unseen real images, blurred or overlaid with a faint one-pixel checkerboard (what transposed
    convolutions draw), served as samples: the spectrum is beyond its real baseline, and the
    reading line names the direction."""
    cfg, _ = fitted
    images, labels = part(cfg, "validation")
    if defect == "blurred":
        images = blur(blur(images))
    else:
        yy, xx = np.indices(images.shape[1:3])
        board = np.where((yy + xx) % 2 == 0, 24, -24)[None, :, :, None]
        images = np.clip(images.astype(np.int16) + board, 0, 255).astype(np.uint8)
    cfg_k1 = cfg.model_copy(deep=True)
    cfg_k1.eval.num_samples = load_reference(cfg).split.draw_size // 2
    m, _ = evaluate_generator(cfg_k1, serving(images, labels), META)
    noise = 2 * np.hypot(m["spectrum_gap_sd"], m["real_spectrum_gap_sd"])
    assert m["spectrum_gap"] - m["real_spectrum_gap"] > noise, m
    if defect == "blurred":
        assert m["spectrum_hf_shift"] < 0 and "smoother than real images" in reading(m)
    else:
        assert m["spectrum_hf_shift"] > 0 and "fine detail real images lack" in reading(m)


@pytest.mark.parametrize("kind", ["verbatim", "noisy", "shifted 1 px", "shifted 2 px", "30 % copies"])
def test_copies_are_flagged(fitted, kind):
    cfg, _ = fitted
    train, labels = part(cfg, "train")
    rng = np.random.default_rng(1)
    if kind == "noisy":
        train = np.clip(train + rng.normal(0, 4, train.shape), 0, 255).astype(np.uint8)
    elif kind.startswith("shifted"):
        px = int(kind.split()[1])
        train = np.pad(train, ((0, 0), (px, 0), (px, 0), (0, 0)), mode="edge")[:, :16, :16]
    if kind == "30 % copies":  # 70 % unseen real images (validation), 30 % training images
        val, val_labels = part(cfg, "validation")
        for i in np.flatnonzero(rng.random(len(val)) < 0.3):  # a training image of the same class
            val[i] = train[rng.choice(np.flatnonzero(labels == val_labels[i]))]
        train, labels = val, val_labels
    m = score_images(
        cfg,
        np.repeat(train, 2, axis=0) if len(train) < 600 else train,
        np.repeat(labels, 2) if len(train) < 600 else labels,
        "test",
    )
    assert m["copying_flagged"] == 1.0, m
    if kind == "verbatim":  # fd alone cannot tell a copy: it sits at the real baseline
        assert m["fd_domain_over_real"] < 1.5


def test_noise_one_image_and_a_dropped_class_score_far_from_real(fitted):
    cfg, _ = fitted
    train, labels = part(cfg, "train")
    noise = np.random.default_rng(0).integers(0, 256, (2000, 16, 16, 1), dtype=np.uint8)
    m_noise = score_images(cfg, noise, None, "validation")
    assert m_noise["fd_domain_over_real"] > 10 and m_noise["precision"] < 0.1
    assert m_noise["spectrum_hf_shift"] > 0.3 and "fine detail real images lack" in reading(m_noise)
    one = np.repeat(train[:1], 2000, axis=0)
    m_one = score_images(cfg, one, None, "validation")
    assert m_one["diversity_over_real"] < 0.05 and m_one["diversity_pixel_over_real"] < 0.05
    assert "less varied than real images" in reading(m_one)
    assert m_noise["diversity_pixel_over_real"] > 1.2  # noise is far apart in pixels
    assert m_one["classes_covered"] == 1 and m_one["recall"] < 0.05 and m_one["fd_domain_over_real"] > 10
    kept = train[labels != 3]
    m_drop = score_images(cfg, kept, None, "validation")
    m_all = score_images(cfg, train, None, "validation")
    assert m_drop["class_kl_reverse"] > m_all["class_kl_reverse"] + 0.03 and m_drop["class_tv"] > m_all["class_tv"]
    assert m_drop["class_fd_over_real"]["3"] is None or m_drop["class_fd_over_real"]["3"] > 2


def test_score_refuses_what_it_cannot_read(fitted, tmp_path):
    cfg, _ = fitted
    with pytest.raises(EvaluationError, match=r"expected uint8 images of shape \(N, 16, 16, 1\)"):
        score_images(cfg, np.zeros((600, 32, 32, 3), np.uint8), None, "test")
    with pytest.raises(EvaluationError, match="fill no draw"):
        score_images(cfg, np.zeros((10, 16, 16, 1), np.uint8), None, "test")
    # fewer than a draw of k = 2 but at least the split's own size: scored at k = 1, baseline too
    m = score_images(cfg, part(cfg, "validation")[0], part(cfg, "validation")[1], "test")
    assert m["sample_size"] == m["reference_size"] and m["draws"] == 1
    with pytest.raises(EvaluationError, match="labels must be"):
        score_images(cfg, np.zeros((600, 16, 16, 1), np.uint8), np.full(600, 12), "test")


def test_missing_or_mismatched_encoder_is_refused(fitted, tmp_path):
    cfg, _ = fitted
    other = resolve_paths(from_dict({"data": {"image_size": 32}}), cfg.root)
    with pytest.raises(EvaluationError, match="encoder is for 16px"):
        load_reference(other)
    nowhere = resolve_paths(from_dict({}), tmp_path)
    with pytest.raises(EvaluationError, match="run `dvc repro encoder`"):
        load_reference(nowhere)


def test_a_hundred_unlabelled_images_are_scored_and_what_cannot_be_computed_is_named(tmp_path):
    """100 images, 15 per held-out split: no refusal; FD in 16 dimensions of 15 images is named
    as bias-dominated, the copy detector still flags copies."""
    rng = np.random.default_rng(0)
    blobs = np.zeros((100, 16, 16), np.uint8)
    for i, (r, c) in enumerate(rng.integers(3, 13, (100, 2))):
        blobs[i, r - 3 : r + 3, c - 3 : c + 3] = 255  # a bright square somewhere
    np.savez(tmp_path / "blobs.npz", images=blobs)  # no labels
    cfg = resolve_paths(
        from_dict(
            {
                "data": {"source": "npz", "path": "blobs.npz", "image_size": 16},
                "eval": {**TINY_EVAL, "feature_dim": 16},
            }
        ),
        tmp_path,
    )
    prepare(cfg)
    metrics = fit_encoder(cfg)
    assert metrics["kind"] == "autoencoder" and metrics["validation_count"] == 15
    train, _ = part(cfg, "train")
    m = score_images(cfg, train, None, "test")
    assert m["reference_size"] == 15 and "fd_domain" in m["not_computed"] and "classes_covered" not in m
    assert m["copying_flagged"] == 1.0
    real = score_images(cfg, part(cfg, "validation")[0], None, "test")
    assert real["copying_flagged"] == 0.0, real["copying_reasons"]


def test_class_match_counts_samples_drawn_as_asked():
    """The class frequencies can be right while every sample is the wrong class: class_match
    catches it (two classes, drawn swapped: frequencies perfect, match 0)."""
    spec = {"quality": {"validation_accuracy": 0.9}}
    asked = np.array([0, 0, 1, 1])
    swapped = np.eye(2)[[1, 1, 0, 0]]
    assert class_match(swapped, asked, spec) == {"class_match": 0.0, "real_class_match": 0.9}
    assert class_match(np.eye(2)[[0, 1, 1, 1]], asked, spec)["class_match"] == 0.75


def test_fd_class_sees_good_images_of_the_wrong_class_that_fd_domain_cannot(fitted):
    """The sweep's objective for a conditional G. Train images served as samples: drawn as asked
    they score a low fd_class; the same images (so the same fd_domain) answering for the next
    class score far worse, though the class frequencies are right."""
    from ganflow.encoder import encode

    cfg, _ = fitted
    reference = load_reference(cfg)
    images, labels = part(cfg, "train")
    features, _ = encode(reference.encoder, as_tensor(images))
    right = reference.quick(features, labels)
    wrong = reference.quick(features, (labels + 1) % 10)
    assert wrong["fd_domain"] == right["fd_domain"]
    assert wrong["fd_class"] > 2 * right["fd_class"], (right, wrong)
    assert "fd_class" not in reference.quick(features)  # an unconditional G: no classes asked


def test_ganflow_score_command_writes_the_numbers_and_refuses_bad_files_in_one_line(fitted, tmp_path):
    import subprocess
    import sys

    import yaml

    cfg, _ = fitted
    params = cfg.root / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"image_size": 16}, "eval": TINY_EVAL}))
    images, labels = part(cfg, "train")
    np.savez(tmp_path / "copies.npz", images=images, labels=labels)
    ganflow = [sys.executable, "-m", "ganflow.cli", "score", "--params", str(params)]
    done = subprocess.run(
        [*ganflow, "--samples", str(tmp_path / "copies.npz"), "--out", str(tmp_path / "s.json")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "test split" in done.stdout and "FLAGGED as copying" in done.stdout
    scored = json.loads((tmp_path / "s.json").read_text())
    assert scored["copying_flagged"] == 1.0 and scored["split"] == "test" and scored["draws"] >= 1

    np.savez(tmp_path / "rgb.npz", images=np.zeros((600, 16, 16, 3), np.uint8))
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    for name, message in (
        ("rgb.npz", "expected uint8 images of shape (N, 16, 16, 1)"),
        ("broken.npz", "not a readable .npz file"),
    ):
        bad = subprocess.run([*ganflow, "--samples", str(tmp_path / name)], capture_output=True, text=True, timeout=600)
        assert bad.returncode != 0 and message in bad.stderr and "Traceback" not in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_only_the_evaluate_stage_and_score_reach_the_test_split():
    """Static guard beside the byte-for-byte encoder test: in ganflow/ and pipelines/, the test
    split is named only in ganflow/evaluation.py (test_split), no module reads the "all" part, and
    the functions that reach test_split are called only by the evaluate stage and `ganflow score`."""
    import ast

    from tests.conftest import REPO

    readers = {"evaluate_generator", "score_images", "test_split"}
    for path in sorted([*(REPO / "ganflow").glob("*.py"), *(REPO / "pipelines").glob("*.py")]):
        rel = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            for kw in node.keywords:
                if kw.arg == "part" and isinstance(kw.value, ast.Constant):
                    assert kw.value.value != "all", rel
                    assert kw.value.value != "test" or rel == "ganflow/evaluation.py", rel
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            if name in readers:
                assert rel in ("ganflow/evaluation.py", "pipelines/evaluate.py", "ganflow/cli.py"), (rel, name)


def test_near_duplicate_threshold_is_the_exact_exchangeable_null():
    """30 samples against the smallest of 30 held-out distances: P(K >= 9) = prod (30 - i) / (60 - i)
    over i < 9 is below 0.001 and P(K >= 8) is not, so 8 of 30 may be 'near' by chance, 9 may not."""
    from ganflow.copying import ALPHA, near_dup_threshold

    p8 = np.prod([(30 - i) / (60 - i) for i in range(8)])
    p9 = p8 * 22 / 52
    assert p9 <= ALPHA < p8 and near_dup_threshold(30, 30) == pytest.approx(8 / 30)
    assert near_dup_threshold(538, 538) < 0.05  # at the digits' size a few per cent


def test_the_reading_says_what_the_ratio_means_at_this_size():
    base = {"split": "test", "reference_size": 15, "fd_domain_over_real_sd": 0.5}
    far = reading({**base, "fd_domain_over_real": 158.0, "not_computed": {"kid": "x", "precision": "y"}})
    assert "158.0x farther from the 15 test images" in far and "only 15 reference images" in far
    assert far.endswith("not computed at this size: kid, precision")
    wide = reading({**base, "fd_domain_over_real": 1.6})  # 1 + 2 sd = 2: blobs would read the same
    assert wide.startswith("reading: inconclusive: 1.60 ± 0.50x") and "cannot be told" not in wide
    assert wide.count("look at the samples") == 1
    blobs = {**base, "fd_domain_over_real": 1.75, "fd_domain_over_real_sd": 2.29, "spectrum_gap": 0.357}
    blobs.update(spectrum_gap_sd=0.051, real_spectrum_gap=0.05, real_spectrum_gap_sd=0.013, spectrum_hf_shift=-0.3)
    said = reading(blobs)  # the 100-photo run's figures
    assert "inconclusive" in said and "7.1x as far" in said and "smoother than real images" in said
    assert said.count("look at the samples") == 1
    narrow = reading({**base, "fd_domain_over_real": 1.2, "fd_domain_over_real_sd": 0.2})
    assert "cannot be told from real images at 15" in narrow
    assert "copies of training images" in reading({**base, "fd_domain_over_real": 0.2, "fd_domain_over_real_sd": 0.1})
    large = reading({**base, "reference_size": 269, "fd_domain_over_real": 2.7, "fd_domain_over_real_sd": 0.6})
    assert "farther" in large and "rough" not in large

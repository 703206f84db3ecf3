"""The encoder stage and the evaluation end to end on the digits, against the held-out split:
unseen real images score near the floor and are not flagged; training images returned verbatim
also score near the floor, and the data-copying test flags them; noise, one repeated image and a
dropped class score far from it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ganflow.config import from_dict, resolve_paths
from ganflow.data import PreparedDataset, prepare
from ganflow.evaluation import EvaluationError, class_match, evaluate_generator, fit_encoder, load_reference
from ganflow.metrics import COPYING_THRESHOLD, data_copying


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    # 30 % held out (539 images), the reference is 250 of them: the other 289 are real images
    # that neither the encoder nor the reference has seen, to score as if a generator drew them
    cfg = resolve_paths(from_dict({
        "data": {"image_size": 16, "holdout_fraction": 0.3},
        "eval": {"num_samples": 250, "encoder_epochs": 6, "kid_subsets": 10, "kid_subset_size": 200},
    }), root)
    prepare(cfg)
    metrics = fit_encoder(cfg)
    # a stand-in generator.json: evaluate_generator reads the latent size from it
    cfg.paths.generator.mkdir(parents=True)
    (cfg.paths.generator / "generator.json").write_text(json.dumps({"latent_dim": 8}))
    return cfg, metrics


def part(cfg, name: str) -> tuple[torch.Tensor, np.ndarray]:
    dataset = PreparedDataset(cfg.paths.prepared, part=name)
    images, labels = dataset.tensors()
    return images, labels.numpy()


def unseen(cfg) -> tuple[torch.Tensor, np.ndarray]:
    """Held-out images that are not in the reference (real, never trained on, never compared with)."""
    from safetensors.torch import load_file

    images, labels = part(cfg, "heldout")
    index = load_file(str(cfg.paths.encoder / "reference.safetensors"))["index"].numpy()
    rest = np.setdiff1d(np.arange(len(images)), index)
    return images[rest], labels[rest]


def serving(images: torch.Tensor):
    """A 'generator' that hands out the given images in order, whatever z it is given."""
    state = {"at": 0}

    def sample(z):
        out = images[state["at"] : state["at"] + len(z)]
        state["at"] += len(z)
        return out

    return sample


def test_encoder_stage_outputs(fitted):
    cfg, metrics = fitted
    manifest = json.loads((cfg.paths.prepared / "manifest.json").read_text())
    assert metrics["kind"] == "classifier" and metrics["heldout_accuracy"] > 0.8
    assert metrics["heldout_count"] == manifest["split"]["heldout"] == 539
    assert metrics["train_count"] == manifest["split"]["train"] and metrics["sample_size"] == 250
    spec = json.loads((cfg.paths.encoder / "encoder.json").read_text())
    assert spec["floors"]["classes_covered"] == 10 and spec["floors"]["fd_domain"] > 0
    assert spec["split_hash"] == manifest["files"]["split.npy"]
    assert sum(spec["class_freq"]) == pytest.approx(1.0) and len(spec["class_floors"]) == 10
    reference = load_reference(cfg)
    assert reference.features.shape == (250, cfg.eval.feature_dim)
    assert reference.train_features.shape == (manifest["split"]["train"], cfg.eval.feature_dim)
    # the reference is made of held-out images: re-encoding them gives the stored features
    held, labels = part(cfg, "heldout")
    from safetensors.torch import load_file

    index = load_file(str(cfg.paths.encoder / "reference.safetensors"))["index"].numpy()
    from ganflow.evaluation import encode

    again, _ = encode(reference.encoder, held[index])
    assert np.allclose(again, reference.features) and np.array_equal(reference.labels, labels[index])


def test_unseen_real_images_score_near_the_floor_and_are_not_flagged(fitted):
    cfg, _ = fitted
    images, _ = unseen(cfg)
    metrics, samples = evaluate_generator(cfg, serving(images[:250]))
    assert samples.shape == (250, 16, 16, 1) and samples.dtype == np.uint8
    assert metrics["fd_domain_over_floor"] < 2.0
    assert metrics["classes_covered"] == 10 and metrics["class_kl"] < 0.05 and metrics["class_tv"] < 0.15
    assert metrics["precision"] > 0.8 and metrics["recall"] > 0.8
    assert metrics["copying_flagged"] == 0.0 and metrics["copying_ct"] > COPYING_THRESHOLD
    assert 0.7 < metrics["copying_nn_ratio"] < 1.4


def test_training_images_returned_verbatim_are_flagged_though_their_fd_is_at_the_floor(fitted):
    cfg, _ = fitted
    train, _ = part(cfg, "train")
    picked = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:250]]
    metrics, _ = evaluate_generator(cfg, serving(picked))
    assert metrics["fd_domain_over_floor"] < 2.0  # fd alone cannot tell a copy from a good generator
    assert metrics["copying_flagged"] == 1.0 and metrics["copying_ct"] < COPYING_THRESHOLD
    assert metrics["copying_nn_ratio"] < 0.05


def test_data_copying_statistic_on_features():
    """Known answers: a set drawn like the held-out one gives C_T ~ 0, copies of training points a
    large negative C_T, points further from the data than real ones a positive one."""
    rng = np.random.default_rng(0)
    train, heldout, fresh = (rng.standard_normal((n, 4)) for n in (2000, 300, 300))
    cells = np.array([[1.0, 0, 0, 0], [-1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, -1.0, 0, 0]])
    same = data_copying(train, heldout, fresh, cells)
    assert abs(same["copying_ct"]) < 2.5 and same["copying_flagged"] == 0.0 and same["copying_cells_used"] == 4
    copies = data_copying(train, heldout, train[:300] + 1e-3, cells)
    assert copies["copying_ct"] < -10 and copies["copying_flagged"] == 1.0 and copies["copying_nn_ratio"] < 0.01
    far = data_copying(train, heldout, fresh * 1.5, cells)
    assert far["copying_ct"] > 3 and far["copying_flagged"] == 0.0


def test_noise_a_repeated_image_and_a_dropped_class_score_far_from_the_floor(fitted):
    cfg, _ = fitted
    noise = torch.rand(250, 1, 16, 16) * 2 - 1
    m_noise, _ = evaluate_generator(cfg, serving(noise))
    assert m_noise["fd_domain_over_floor"] > 20 and m_noise["precision"] < 0.1

    images, labels = unseen(cfg)
    one = images[:1].repeat(250, 1, 1, 1)
    m_one, _ = evaluate_generator(cfg, serving(one))
    assert m_one["classes_covered"] == 1 and m_one["class_tv"] > 0.85
    assert m_one["class_kl"] == pytest.approx(math.log(1 / 0.1), rel=0.1)  # one class of ten
    assert m_one["fd_domain_over_floor"] > 20 and m_one["recall"] < 0.05
    assert m_one["is_domain"] < 1.5

    # the same unseen images without the 3s: KL(generated || real) hardly moves, the reverse KL,
    # the total variation and the per-class table show it
    kept = images[labels != 3]
    m_drop, _ = evaluate_generator(cfg, serving(kept[torch.arange(250) % len(kept)]))
    m_all, _ = evaluate_generator(cfg, serving(images[:250]))
    assert m_drop["class_freq"]["3"] < 0.03
    assert m_drop["class_kl_reverse"] > m_drop["class_kl"] and m_drop["class_kl_reverse"] > 3 * m_all["class_kl_reverse"]
    assert m_drop["class_tv"] > m_all["class_tv"] + 0.02
    assert m_drop["class_fd_over_floor"]["3"] is None or m_drop["class_fd_over_floor"]["3"] > 3
    assert m_all["class_fd_over_floor_max"] is not None


def test_inception_fid_with_a_local_torchscript_file(fitted, tmp_path):
    """The Inception path runs on any TorchScript extractor the user points at; here a tiny one."""
    cfg, _ = fitted
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, 4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten())
    torch.manual_seed(0)
    weights = tmp_path / "inception.pt"
    torch.jit.script(net).save(str(weights))
    with_weights = cfg.model_copy(deep=True)
    with_weights.eval.inception_weights = weights
    images, _ = unseen(cfg)
    real, _ = evaluate_generator(with_weights, serving(images[:250]))
    noise, _ = evaluate_generator(with_weights, serving(torch.rand(250, 1, 16, 16) * 2 - 1))
    assert 0 <= real["fid_inception"] < noise["fid_inception"]

    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with_weights.eval.inception_weights = tmp_path / "bad.pt"
    with pytest.raises(EvaluationError, match="is not a TorchScript model"):
        evaluate_generator(with_weights, serving(images[:250]))


def test_missing_or_mismatched_encoder_is_refused(fitted, tmp_path):
    cfg, _ = fitted
    other = resolve_paths(from_dict({"data": {"image_size": 32}}), cfg.root)
    with pytest.raises(EvaluationError, match="encoder is for 16px"):
        load_reference(other)
    nowhere = resolve_paths(from_dict({}), tmp_path)
    with pytest.raises(EvaluationError, match="run `dvc repro encoder`"):
        load_reference(nowhere)


def test_unlabelled_data_gets_an_autoencoder_and_no_class_metrics(tmp_path):
    rng = np.random.default_rng(0)
    blobs = np.zeros((400, 16, 16), np.uint8)
    for i, (r, c) in enumerate(rng.integers(2, 14, (400, 2))):
        blobs[i, r - 2 : r + 2, c - 2 : c + 2] = 255  # a bright square somewhere
    np.savez(tmp_path / "blobs.npz", images=blobs)  # no labels
    cfg = resolve_paths(from_dict({
        "data": {"source": "npz", "path": "blobs.npz", "image_size": 16, "holdout_fraction": 0.25},
        "eval": {"num_samples": 50, "encoder_epochs": 3, "feature_dim": 16, "kid_subsets": 5, "kid_subset_size": 40},
    }), tmp_path)
    prepare(cfg)
    metrics = fit_encoder(cfg)
    assert metrics["kind"] == "autoencoder" and math.isfinite(metrics["heldout_reconstruction_mse"])
    assert "floor_classes_covered" not in metrics and metrics["floor_fd_domain"] > 0
    cfg.paths.generator.mkdir(parents=True)
    (cfg.paths.generator / "generator.json").write_text(json.dumps({"latent_dim": 4}))
    real, _ = evaluate_generator(cfg, serving(unseen(cfg)[0][:50]))
    noise, _ = evaluate_generator(cfg, serving(torch.rand(50, 1, 16, 16) * 2 - 1))
    assert "classes_covered" not in real
    assert noise["fd_domain"] > 5 * real["fd_domain"]


def test_class_match_counts_samples_drawn_as_asked(tmp_path):
    """The class frequencies can be right while every sample is the wrong class: class_match
    catches it (two classes, drawn swapped: frequencies perfect, match 0)."""
    (tmp_path / "encoder.json").write_text(json.dumps({"quality": {"heldout_accuracy": 0.9}}))
    asked = np.array([0, 0, 1, 1])
    swapped = np.eye(2)[[1, 1, 0, 0]]
    assert class_match(swapped, asked, tmp_path) == {"class_match": 0.0, "floor_class_match": 0.9}
    assert class_match(np.eye(2)[[0, 1, 1, 1]], asked, tmp_path)["class_match"] == 0.75

"""The encoder stage and the evaluation end to end on the digits: real images score at the
floor, noise and a single repeated image far from it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ganflow.config import from_dict, resolve_paths
from ganflow.data import PreparedDataset, prepare
from ganflow.evaluation import (
    EvaluationError, evaluate_generator, fit_encoder, load_reference, split_indices,
)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    cfg = resolve_paths(from_dict({
        "data": {"image_size": 16},
        "eval": {"num_samples": 300, "encoder_epochs": 6, "kid_subsets": 10, "kid_subset_size": 200},
    }), root)
    prepare(cfg)
    metrics = fit_encoder(cfg)
    # a stand-in generator.json: evaluate_generator reads the latent size from it
    cfg.paths.generator.mkdir(parents=True)
    (cfg.paths.generator / "generator.json").write_text(json.dumps({"latent_dim": 8}))
    return cfg, metrics


def images_of(cfg, indices) -> torch.Tensor:
    dataset = PreparedDataset(cfg.paths.prepared)
    return torch.stack([dataset[int(i)][0] for i in indices])


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
    assert metrics["kind"] == "classifier" and metrics["heldout_accuracy"] > 0.8
    assert metrics["sample_size"] == 300
    spec = json.loads((cfg.paths.encoder / "encoder.json").read_text())
    assert spec["floors"]["classes_covered"] == 10 and spec["floors"]["fd_domain"] > 0
    assert sum(spec["class_freq"]) == pytest.approx(1.0)
    reference = load_reference(cfg)
    assert reference.features.shape == (300, cfg.eval.feature_dim)
    # the stored reference is half A exactly: re-encoding it gives the same statistics
    assert np.allclose(reference.mu, reference.features.mean(0))


def test_real_held_out_images_score_near_the_floor(fitted):
    cfg, _ = fitted
    split = split_indices(1797, cfg.eval.num_samples, cfg.eval.seed)
    held = images_of(cfg, split.held_out[:300])
    metrics, samples = evaluate_generator(cfg, serving(held))
    assert samples.shape == (300, 16, 16, 1) and samples.dtype == np.uint8
    assert metrics["fd_domain_over_floor"] < 2.0
    assert metrics["classes_covered"] == 10 and metrics["class_kl"] < 0.05
    assert metrics["precision"] > 0.8 and metrics["recall"] > 0.8
    assert abs(metrics["kid"]) < 0.2


def test_noise_and_a_repeated_image_score_far_from_the_floor(fitted):
    cfg, _ = fitted
    noise = torch.rand(300, 1, 16, 16) * 2 - 1
    m_noise, _ = evaluate_generator(cfg, serving(noise))
    assert m_noise["fd_domain_over_floor"] > 20 and m_noise["precision"] < 0.1

    one = images_of(cfg, [0]).repeat(300, 1, 1, 1)
    m_one, _ = evaluate_generator(cfg, serving(one))
    assert m_one["classes_covered"] == 1
    assert m_one["class_kl"] == pytest.approx(math.log(1 / 0.099), rel=0.1)  # one class of ten
    assert m_one["fd_domain_over_floor"] > 20 and m_one["recall"] < 0.05
    assert m_one["is_domain"] < 1.5


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
    split = split_indices(1797, cfg.eval.num_samples, cfg.eval.seed)
    real, _ = evaluate_generator(with_weights, serving(images_of(cfg, split.half_b)))
    noise, _ = evaluate_generator(with_weights, serving(torch.rand(300, 1, 16, 16) * 2 - 1))
    assert 0 <= real["fid_inception"] < noise["fid_inception"]

    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with_weights.eval.inception_weights = tmp_path / "bad.pt"
    with pytest.raises(EvaluationError, match="is not a TorchScript model"):
        evaluate_generator(with_weights, serving(images_of(cfg, split.half_b)))


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
    blobs = np.zeros((120, 16, 16), np.uint8)
    for i, (r, c) in enumerate(rng.integers(2, 14, (120, 2))):
        blobs[i, r - 2 : r + 2, c - 2 : c + 2] = 255  # a bright square somewhere
    np.savez(tmp_path / "blobs.npz", images=blobs)  # no labels
    cfg = resolve_paths(from_dict({
        "data": {"source": "npz", "path": "blobs.npz", "image_size": 16},
        "eval": {"num_samples": 50, "encoder_epochs": 3, "kid_subsets": 5, "kid_subset_size": 40},
    }), tmp_path)
    prepare(cfg)
    metrics = fit_encoder(cfg)
    assert metrics["kind"] == "autoencoder" and math.isfinite(metrics["heldout_reconstruction_mse"])
    assert "floor_classes_covered" not in metrics and metrics["floor_fd_domain"] > 0
    cfg.paths.generator.mkdir(parents=True)
    (cfg.paths.generator / "generator.json").write_text(json.dumps({"latent_dim": 4}))
    split = split_indices(120, 50, cfg.eval.seed)
    real, _ = evaluate_generator(cfg, serving(images_of(cfg, split.half_b)))
    noise, _ = evaluate_generator(cfg, serving(torch.rand(50, 1, 16, 16) * 2 - 1))
    assert "classes_covered" not in real
    assert noise["fd_domain"] > 5 * real["fd_domain"]

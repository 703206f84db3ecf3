"""Sample quality without internet: a domain encoder trained on the real data, and GAN metrics
(ganflow.metrics) in its feature space, each reported next to its real-vs-real floor.

The encoder is a small CNN: a classifier when the data has labels (its penultimate layer gives
the features, its softmax the class predictions), otherwise an autoencoder (its bottleneck
gives the features). It uses the split the prepare stage made once:
  - the train part (what the GAN learns from) fits the encoder;
  - the held-out part, never trained on by the encoder or the GAN, scores the encoder and is the
    reference every generated set is compared with;
  - the floor of every metric is a sample of real train images of the reference's size against
    the held-out reference: "as close to unseen real images as real images are".
A generator that returns its training images scores at the floor, not below it; the data-copying
test (copying_ct) is what catches it, by comparing nearest-training-image distances of the
generated and the held-out images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ganflow.atomic import atomic_dir, write_bytes
from ganflow.config import Config
from ganflow.data import PreparedDataset, prepared_hash
from ganflow.errors import GanflowError, first_line
from ganflow.metrics import (
    class_metrics,
    data_copying,
    feature_stats,
    frechet_distance,
    kid,
    kmeans_cells,
    per_class_fd,
    precision_recall,
)

WEIGHTS = "encoder.safetensors"
SPEC = "encoder.json"
REFERENCE = "reference.safetensors"  # held-out and train features, the copying test's cells
MIN_HELDOUT = 20  # held-out images below which no metric is worth computing
TRAIN_FEATURES_MAX = 10_000  # train images (a seeded sample) the copying test measures distances to
FLOOR_DRAWS = 5  # train samples the floor is averaged over (one draw of ~300 images is noisy)
CELL_SIZE = 25  # held-out images per cell of the copying test (at most MAX_CELLS cells)
MAX_CELLS = 20


class EvaluationError(GanflowError):
    """The encoder or the evaluation cannot be used."""


# ------------------------------------------------------------------------------------- the encoder


class Encoder(nn.Module):
    """(B, C, S, S) in [-1, 1] -> features (B, feature_dim); a class head or a decoder on top."""

    def __init__(self, channels: int, image_size: int, feature_dim: int, num_classes: int):
        super().__init__()
        self.channels, self.image_size = channels, image_size
        self.feature_dim, self.num_classes = feature_dim, num_classes
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, 2, 1), nn.ReLU(inplace=True),  # (B, 32, S/2, S/2)
            nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(inplace=True),  # (B, 64, S/4, S/4)
            nn.Conv2d(64, 128, 3, 2, 1), nn.ReLU(inplace=True),  # (B, 128, S/8, S/8)
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),  # (B, 512)
            nn.Linear(512, feature_dim),
        )
        # one factor for all feature dimensions, set after training so the real features have
        # unit mean variance: keeps KID's cubic kernel in a sane range on any dataset
        self.register_buffer("feature_scale", torch.ones(()))
        if num_classes > 0:
            # classifier: features -> class logits
            self.head: nn.Module = nn.Sequential(nn.ReLU(), nn.Dropout(0.3), nn.Linear(feature_dim, num_classes))
        else:
            # autoencoder: features -> (B, C, S, S) reconstruction in [-1, 1]
            side = image_size // 8
            self.head = nn.Sequential(
                nn.Linear(feature_dim, 128 * side * side), nn.ReLU(inplace=True),
                nn.Unflatten(1, (128, side, side)),
                nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.ReLU(inplace=True),
                nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(inplace=True),
                nn.ConvTranspose2d(32, channels, 4, 2, 1), nn.Tanh(),
            )

    @property
    def labelled(self) -> bool:
        return self.num_classes > 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features scaled by feature_scale, class logits or reconstruction)."""
        features = self.body(x)
        return features * self.feature_scale, self.head(features)


def heldout_minimum(cfg: Config) -> int:
    """The fewest held-out images the metrics accept: MIN_HELDOUT, and more than
    eval.feature_dim (a covariance of D features needs more than D samples to be full rank)."""
    return max(MIN_HELDOUT, cfg.eval.feature_dim + 1)


def fit_encoder(cfg: Config) -> dict[str, Any]:
    """The encoder stage: train the encoder on the train split, compute the held-out reference
    and the floors, write paths.encoder (atomically). Returns the encoder's metrics."""
    train = PreparedDataset(cfg.paths.prepared, part="train")
    held = PreparedDataset(cfg.paths.prepared, part="heldout")
    manifest = train.manifest
    labelled = bool(manifest["labelled"]) and len(manifest["class_names"]) >= 2
    if len(train) < 8:
        raise EvaluationError(f"{cfg.paths.prepared}: {len(train)} training images are too few to fit an encoder "
                              "(need 8)")
    minimum = heldout_minimum(cfg)
    if len(held) < minimum:
        raise EvaluationError(
            f"{cfg.paths.prepared}: the held-out split has {len(held)} images, fewer than the {minimum} the "
            f"metrics need (at least {MIN_HELDOUT} and more than eval.feature_dim={cfg.eval.feature_dim}): "
            "raise data.holdout_fraction, lower eval.feature_dim, or add images"
        )
    x_train, y_train = train.tensors()  # (N, C, S, S) in [-1, 1], (N,)
    x_held, y_held = held.tensors()

    torch.manual_seed(cfg.eval.seed)
    num_classes = len(manifest["class_names"]) if labelled else 0
    encoder = Encoder(cfg.data.channels, cfg.data.image_size, cfg.eval.feature_dim, num_classes)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(cfg.eval.seed)
    for _ in range(cfg.eval.encoder_epochs):
        encoder.train()
        for batch in torch.randperm(len(x_train), generator=generator).split(128):
            x = x_train[batch]
            _, out = encoder(x)
            # classifier: cross-entropy on the labels; autoencoder: reconstruct the input
            loss = nn.functional.cross_entropy(out, y_train[batch]) if labelled else nn.functional.mse_loss(out, x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    encoder.eval()
    with torch.no_grad():
        train_features = torch.cat([encoder.body(x) for x in x_train.split(500)])
        encoder.feature_scale.fill_(1.0 / float(train_features.var(dim=0).mean().sqrt().clamp_min(1e-8)))
        _, out = encoder(x_held)
    if labelled:
        quality = {"heldout_accuracy": float((out.argmax(1) == y_held).float().mean())}
    else:
        quality = {"heldout_reconstruction_mse": float(nn.functional.mse_loss(out, x_held))}

    # the reference: held-out images (all of them up to eval.num_samples); the floor: as many
    # train images, averaged over FLOOR_DRAWS draws; the copying test: up to TRAIN_FEATURES_MAX
    # train images
    rng = np.random.default_rng(cfg.eval.seed)
    size = min(cfg.eval.num_samples, len(held), len(train))
    ref_index = np.sort(rng.permutation(len(held))[:size])
    copy_index = np.sort(rng.permutation(len(train))[:TRAIN_FEATURES_MAX])
    feats_ref, _ = encode(encoder, x_held[ref_index])
    feats_all, probs_all = encode(encoder, x_train)
    feats_train = feats_all[copy_index]
    cells = kmeans_cells(feats_train, min(MAX_CELLS, max(1, size // CELL_SIZE)), cfg.eval.seed)
    all_labels = np.concatenate([train.labels, held.labels])
    class_freq = np.bincount(all_labels, minlength=num_classes) / len(all_labels) if labelled else np.zeros(0)
    class_names = list(manifest["class_names"]) if labelled else []
    reference = Reference(encoder, feats_ref, y_held.numpy()[ref_index], *feature_stats(feats_ref), feats_train,
                          cells, class_freq, class_names, {}, {}, cfg)
    draws = []
    for _ in range(FLOOR_DRAWS):
        index = np.sort(rng.permutation(len(train))[:size])
        draws.append(reference.metrics(feats_all[index], None if probs_all is None else probs_all[index],
                                       copying=False))
    floors = {k: float(np.mean([d[k] for d in draws])) for k in draws[0] if k != "class_fd"}
    class_floors = {name: _mean_or_none([d["class_fd"][name] for d in draws]) for name in class_names}
    spec = {
        "kind": "classifier" if labelled else "autoencoder",
        "channels": cfg.data.channels,
        "image_size": cfg.data.image_size,
        "feature_dim": cfg.eval.feature_dim,
        "num_classes": num_classes,
        "class_names": class_names,
        "class_freq": class_freq.tolist(),
        "sample_size": int(size),
        "train_count": len(train),
        "heldout_count": len(held),
        "floors": floors,
        "class_floors": class_floors,
        "quality": quality,
        "data_hash": prepared_hash(cfg.paths.prepared),
        "split_hash": manifest["files"]["split.npy"],
    }
    with atomic_dir(cfg.paths.encoder) as tmp:
        save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(tmp / WEIGHTS))
        save_file(
            {"features": torch.from_numpy(feats_ref), "labels": torch.from_numpy(reference.labels),
             "index": torch.from_numpy(ref_index), "mu": torch.from_numpy(reference.mu),
             "sigma": torch.from_numpy(reference.sigma), "train_features": torch.from_numpy(feats_train),
             "cells": torch.from_numpy(cells)},
            str(tmp / REFERENCE),
        )
        write_bytes(tmp / SPEC, (json.dumps(spec, indent=2, sort_keys=True) + "\n").encode())
    return {"kind": spec["kind"], "sample_size": spec["sample_size"], "train_count": len(train),
            "heldout_count": len(held), **quality, **{f"floor_{k}": v for k, v in floors.items()}}


def _mean_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def encode(encoder: Encoder, images: torch.Tensor, batch: int = 500) -> tuple[np.ndarray, np.ndarray | None]:
    """images (N, C, S, S) in [-1, 1] -> (features (N, D) float64, class probabilities (N, K) or None)."""
    feats, probs = [], []
    encoder.eval()
    with torch.no_grad():
        for chunk in images.split(batch):
            f, out = encoder(chunk.float())
            feats.append(f.double().cpu().numpy())
            if encoder.labelled:
                probs.append(torch.softmax(out.double(), dim=1).cpu().numpy())
    return np.concatenate(feats), (np.concatenate(probs) if encoder.labelled else None)


# ------------------------------------------------------------------------------------- the reference


@dataclass
class Reference:
    """What generated samples are measured against: the encoder and the held-out real images."""

    encoder: Encoder
    features: np.ndarray  # (n, D) the held-out reference
    labels: np.ndarray  # (n,) their classes (-1 when unlabelled)
    mu: np.ndarray
    sigma: np.ndarray
    train_features: np.ndarray  # (m, D) train images: what "copied" means
    cells: np.ndarray  # (k, D) the copying test's partition of the feature space
    class_freq: np.ndarray  # (K,) real class frequencies; empty when unlabelled
    class_names: list[str]
    floors: dict[str, float]
    class_floors: dict[str, float | None]
    cfg: Config

    @property
    def sample_size(self) -> int:
        return len(self.features)

    def quick(self, features: np.ndarray) -> dict[str, float]:
        """The in-training metrics: fd_domain and KID."""
        mu, sigma = feature_stats(features)
        kid_mean, kid_std = kid(self.features, features, self.cfg.eval.kid_subsets, self.cfg.eval.kid_subset_size,
                                self.cfg.eval.seed)
        return {"fd_domain": frechet_distance(self.mu, self.sigma, mu, sigma), "kid": kid_mean, "kid_std": kid_std}

    def metrics(self, features: np.ndarray, probs: np.ndarray | None, copying: bool = True) -> dict[str, Any]:
        """Every metric of a generated (or real) set against the held-out reference. ``copying``:
        the data-copying test (meaningless for a set of train images, which the floor is)."""
        out: dict[str, Any] = self.quick(features)
        out["precision"], out["recall"] = precision_recall(self.features, features, self.cfg.eval.pr_k)
        if probs is not None and len(self.class_freq):
            out.update(class_metrics(probs, self.class_freq))
            out["class_fd"] = per_class_fd(self.features, self.labels, features, probs.argmax(1), self.class_names)
        if copying:
            out.update(data_copying(self.train_features, self.features, features, self.cells))
        return out


def load_reference(cfg: Config) -> Reference:
    path = cfg.paths.encoder
    if not (path / SPEC).is_file():
        raise EvaluationError(f"{path}: no encoder here (missing {SPEC}); run `dvc repro encoder`")
    spec = json.loads((path / SPEC).read_text())
    if "split_hash" not in spec:
        raise EvaluationError(f"{path}: an encoder from before the held-out split; run `dvc repro encoder`")
    if (spec["channels"], spec["image_size"]) != (cfg.data.channels, cfg.data.image_size):
        raise EvaluationError(
            f"{path}: encoder is for {spec['image_size']}px x{spec['channels']} images, the data is "
            f"{cfg.data.image_size}px x{cfg.data.channels}; run `dvc repro encoder`"
        )
    encoder = Encoder(spec["channels"], spec["image_size"], spec["feature_dim"], spec["num_classes"])
    encoder.load_state_dict(load_file(str(path / WEIGHTS)))  # safetensors: nothing unpickled
    encoder.eval()
    ref = {k: v.numpy() for k, v in load_file(str(path / REFERENCE)).items()}
    return Reference(
        encoder, ref["features"], ref["labels"], ref["mu"], ref["sigma"], ref["train_features"], ref["cells"],
        np.asarray(spec["class_freq"]), spec["class_names"], spec["floors"], spec["class_floors"], cfg,
    )


def reference_images(cfg: Config) -> torch.Tensor:
    """The held-out reference images themselves (N, C, S, S) in [-1, 1], in the reference's order."""
    index = load_file(str(cfg.paths.encoder / REFERENCE))["index"].numpy()
    images, _ = PreparedDataset(cfg.paths.prepared, part="heldout").tensors()
    return images[torch.as_tensor(index)]


def with_floors(metrics: dict[str, Any], floors: dict[str, float],
                class_floors: dict[str, float | None] | None = None) -> dict[str, Any]:
    """Metrics next to their floors, plus fd_domain / floor (overall and per class)."""
    out: dict[str, Any] = dict(metrics)
    out.update({f"floor_{k}": v for k, v in floors.items() if k in metrics})
    if floors.get("fd_domain"):
        out["fd_domain_over_floor"] = metrics["fd_domain"] / floors["fd_domain"]
    if "class_fd" in metrics and class_floors:
        ratios = {name: (fd / class_floors[name] if fd is not None and class_floors.get(name) else None)
                  for name, fd in metrics["class_fd"].items()}
        out["class_fd_over_floor"] = ratios
        # the weakest class; null when a class is never drawn (classes_covered says which are)
        known = [r for r in ratios.values() if r is not None]
        out["class_fd_over_floor_max"] = max(known) if known and len(known) == len(ratios) else None
    return out


# ------------------------------------------------------------------------------------- Inception FID


def inception_features(model: torch.jit.ScriptModule, images: torch.Tensor, batch: int = 100) -> np.ndarray:
    """images (N, C, S, S) in [-1, 1] -> features of a TorchScript Inception network, which takes
    (N, 3, 299, 299) float in [0, 255] (grayscale is repeated to 3 channels)."""
    out = []
    with torch.no_grad():
        for chunk in images.split(batch):
            x = (chunk.float().clamp(-1, 1) + 1) * 127.5
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            x = nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            out.append(model(x).reshape(len(x), -1).double().cpu().numpy())
    return np.concatenate(out)


def inception_fid(weights: Path, real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance in the feature space of a local Inception network (never downloaded)."""
    if not weights.is_file():
        raise EvaluationError(f"eval.inception_weights: file not found: {weights}")
    try:
        model = torch.jit.load(str(weights), map_location="cpu").eval()
    except (RuntimeError, ValueError) as exc:
        raise EvaluationError(f"eval.inception_weights: {weights} is not a TorchScript model ({first_line(exc)})") from None
    fr, ff = inception_features(model, real), inception_features(model, fake)
    return frechet_distance(*feature_stats(fr), *feature_stats(ff))


# ------------------------------------------------------------------------------------- the evaluate stage


def class_match(probs: np.ndarray, asked: np.ndarray, encoder_dir: Path) -> dict[str, float]:
    """The share of a conditional G's samples that the encoder's classifier puts in the class G
    was asked for, next to its floor: the classifier's accuracy on the held-out real images (a
    G cannot be expected to beat the judge). The class frequencies alone cannot tell a G that
    draws the wrong digit for each class at the right overall rates."""
    spec = json.loads((Path(encoder_dir) / SPEC).read_text())
    out = {"class_match": float((probs.argmax(1) == asked).mean())}
    accuracy = spec.get("quality", {}).get("heldout_accuracy")
    if accuracy is not None:
        out["floor_class_match"] = float(accuracy)
    return out


def evaluate_generator(cfg: Config, sample_fn, reference: Reference | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """Every metric of ``sample_fn(code) -> images (N, C, S, S) in [-1, 1]`` (the generator at
    paths.generator) against the held-out reference, next to its floor. Returns (metrics, the
    samples as uint8 (N, S, S, C)). A conditional G is asked for its classes at their training
    frequencies; whether it draws what it is asked is what the class metrics then measure.

    The latent vectors are drawn with eval.seed + 1, not the eval.seed that picked the best
    epoch during training, so the selection does not flatter the final figure.
    """
    from ganflow.models import draw_codes
    from ganflow.sampling import generator_meta, to_uint8

    reference = reference if reference is not None else load_reference(cfg)
    n = reference.sample_size
    meta = generator_meta(cfg.paths.generator)
    z = draw_codes(n, meta["latent_dim"], meta["class_prior"], torch.Generator().manual_seed(cfg.eval.seed + 1))
    images = torch.cat([torch.as_tensor(sample_fn(chunk)) for chunk in z.split(500)]).float()
    features, probs = encode(reference.encoder, images)
    metrics = with_floors(reference.metrics(features, probs), reference.floors, reference.class_floors)
    metrics["sample_size"] = n
    if probs is not None:
        counts = np.bincount(probs.argmax(1), minlength=len(reference.class_names))
        metrics["class_freq"] = {name: float(c / n) for name, c in zip(reference.class_names, counts)}
        if meta["class_prior"]:  # a conditional G: does it draw the class it is asked for?
            metrics.update(class_match(probs, z[:, meta["latent_dim"]:].argmax(1).numpy(), cfg.paths.encoder))
    if cfg.eval.inception_weights is not None:
        metrics["fid_inception"] = inception_fid(cfg.eval.inception_weights, reference_images(cfg), images)
    return metrics, to_uint8(images)


"""The domain encoder: the feature space every quality number of ganflow is measured in.

No weights can be downloaded, so the encoder is trained here, on the real train split: a small
CNN classifier when the data has labels (its penultimate layer gives the features, its softmax
the class predictions), otherwise an autoencoder (its bottleneck gives the features). It is
trained on two random translations of each image (up to SHIFT_FRACTION of the side: 3 px at
32 px, edges replicated) with a term pulling the two views' features together (INVARIANCE) and one
keeping every feature's spread across the batch at least 1 (SPREAD, so that they cannot collapse
instead; the variance term of VICReg, Bardes et al. 2022). Augmentation alone left the features
position-coded: held-out digits moved by 1 px scored 3x the real baseline. It is not trained to be
invariant to flips, rotations, scale or colour.

The encoder stage writes paths.encoder: the weights (ENCODER_WEIGHTS), the spec (SPEC) and the
validation reference (REFERENCE): validation features and labels, the train features and labels
(the real baseline's draws and the copy detector's "training images"), and the copy detector's
cells. It never reads the test split.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ganflow.artifacts import ENCODER_SPEC as SPEC
from ganflow.artifacts import ENCODER_WEIGHTS, REFERENCE, prepared_hash
from ganflow.atomic import atomic_dir, write_bytes
from ganflow.config import Config
from ganflow.dataset import PreparedDataset
from ganflow.errors import GanflowError
from ganflow.metrics import kmeans_cells

TRAIN_FEATURES_MAX = 10_000  # train images (a seeded sample) kept for baselines and the copy detector
CELL_SIZE = 25  # held-out images per cell of the copy detector (at most MAX_CELLS cells)
MAX_CELLS = 20
SHIFT_FRACTION = 3 / 32  # the encoder's training translations, as a share of the image side
INVARIANCE = 20.0  # weight of the mean squared feature difference between two shifted views
SPREAD = 1.0  # weight of the hinge keeping each feature's batch sd at least 1


class EvaluationError(GanflowError):
    """The encoder or the evaluation cannot be used."""


class Encoder(nn.Module):
    """(B, C, S, S) in [-1, 1] -> features (B, feature_dim); a class head or a decoder on top."""

    def __init__(self, channels: int, image_size: int, feature_dim: int, num_classes: int):
        super().__init__()
        self.channels, self.image_size = channels, image_size
        self.feature_dim, self.num_classes = feature_dim, num_classes
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, 2, 1),
            nn.ReLU(inplace=True),  # (B, 32, S/2, S/2)
            nn.Conv2d(32, 64, 3, 2, 1),
            nn.ReLU(inplace=True),  # (B, 64, S/4, S/4)
            nn.Conv2d(64, 128, 3, 2, 1),
            nn.ReLU(inplace=True),  # (B, 128, S/8, S/8)
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),  # (B, 512)
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
                nn.Linear(feature_dim, 128 * side * side),
                nn.ReLU(inplace=True),
                nn.Unflatten(1, (128, side, side)),
                nn.ConvTranspose2d(128, 64, 4, 2, 1),
                nn.ReLU(inplace=True),
                nn.ConvTranspose2d(64, 32, 4, 2, 1),
                nn.ReLU(inplace=True),
                nn.ConvTranspose2d(32, channels, 4, 2, 1),
                nn.Tanh(),
            )

    @property
    def labelled(self) -> bool:
        return self.num_classes > 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features scaled by feature_scale, class logits or reconstruction)."""
        features = self.body(x)
        return features * self.feature_scale, self.head(features)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """(B, C, S, S) -> each image translated by its own (dy, dx) in [-max_shift, max_shift],
    the edges replicated."""
    if max_shift <= 0:
        return x
    side = x.shape[-1]
    padded = nn.functional.pad(x, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (len(x), 2), generator=generator)
    return torch.stack([padded[i, :, oy : oy + side, ox : ox + side] for i, (oy, ox) in enumerate(offsets.tolist())])


def fit_encoder(cfg: Config) -> dict[str, Any]:
    """The encoder stage: train the encoder on the train split, encode the validation reference
    and the train images, write paths.encoder (atomically). Returns the encoder's metrics."""
    train = PreparedDataset(cfg.paths.prepared, part="train")
    val = PreparedDataset(cfg.paths.prepared, part="validation")
    manifest = train.manifest
    labelled = bool(manifest["labelled"]) and len(manifest["class_names"]) >= 2
    if len(train) < 8:
        raise EvaluationError(
            f"{cfg.paths.prepared}: {len(train)} training images are too few to fit an encoder (need 8)"
        )
    if len(val) < 2:
        raise EvaluationError(
            f"{cfg.paths.prepared}: the validation split has {len(val)} images (need 2); "
            "raise data.validation_fraction or add images"
        )
    x_train, y_train = train.tensors()  # (N, C, S, S) in [-1, 1], (N,)
    x_val, y_val = val.tensors()

    torch.manual_seed(cfg.eval.seed)
    num_classes = len(manifest["class_names"]) if labelled else 0
    encoder = Encoder(cfg.data.channels, cfg.data.image_size, cfg.eval.feature_dim, num_classes)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(cfg.eval.seed)
    max_shift = max(1, round(cfg.data.image_size * SHIFT_FRACTION))
    for _ in range(cfg.eval.encoder_epochs):
        encoder.train()
        for batch in torch.randperm(len(x_train), generator=generator).split(128):
            x = x_train[batch]
            views = [random_shift(x, max_shift, generator) for _ in range(2)]  # (B, C, S, S) each
            feats = [encoder.body(v) for v in views]  # (B, D) each, before feature_scale
            outs = [encoder.head(f) for f in feats]
            # classifier: cross-entropy on the labels; autoencoder: reconstruct the unshifted image
            # (its features need not say where the image was moved to)
            loss = sum(
                nn.functional.cross_entropy(o, y_train[batch]) if labelled else nn.functional.mse_loss(o, x)
                for o in outs
            )
            loss = loss + INVARIANCE * (feats[0] - feats[1]).pow(2).mean()
            if len(batch) > 1:
                loss = loss + SPREAD * sum(torch.relu(1.0 - f.std(dim=0)).mean() for f in feats)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    encoder.eval()
    with torch.no_grad():
        train_features = torch.cat([encoder.body(x) for x in x_train.split(500)])
        encoder.feature_scale.fill_(1.0 / float(train_features.var(dim=0).mean().sqrt().clamp_min(1e-8)))
        _, out = encoder(x_val)
    if labelled:
        quality = {"validation_accuracy": float((out.argmax(1) == y_val).float().mean())}
    else:
        quality = {"validation_reconstruction_mse": float(nn.functional.mse_loss(out, x_val))}

    rng = np.random.default_rng(cfg.eval.seed)
    train_index = np.sort(rng.permutation(len(train))[:TRAIN_FEATURES_MAX])
    feats_val, _ = encode(encoder, x_val)
    feats_train, _ = encode(encoder, x_train[torch.as_tensor(train_index)])
    cells = kmeans_cells(feats_train, min(MAX_CELLS, max(1, len(val) // CELL_SIZE)), cfg.eval.seed)
    class_names = list(manifest["class_names"]) if labelled else []
    counts = manifest["split"]["train_class_counts"]
    class_freq = np.asarray([counts[n] for n in class_names], dtype=np.float64)
    class_freq = class_freq / class_freq.sum() if labelled else np.zeros(0)
    spec = {
        "kind": "classifier" if labelled else "autoencoder",
        "channels": cfg.data.channels,
        "image_size": cfg.data.image_size,
        "feature_dim": cfg.eval.feature_dim,
        "num_classes": num_classes,
        "class_names": class_names,
        "class_freq": class_freq.tolist(),
        "train_count": len(train),
        "validation_count": len(val),
        "translation_px": max_shift,
        "quality": quality,
        "data_hash": prepared_hash(cfg.paths.prepared),
        "split_hash": manifest["files"]["split.npy"],
    }
    with atomic_dir(cfg.paths.encoder) as tmp:
        save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(tmp / ENCODER_WEIGHTS))
        save_file(
            {
                "validation_features": torch.from_numpy(feats_val),
                "validation_labels": torch.as_tensor(val.labels, dtype=torch.long),
                "train_features": torch.from_numpy(feats_train),
                "train_labels": torch.as_tensor(train.labels[train_index], dtype=torch.long),
                "train_index": torch.from_numpy(train_index),
                "cells": torch.from_numpy(cells),
            },
            str(tmp / REFERENCE),
        )
        write_bytes(tmp / SPEC, (json.dumps(spec, indent=2, sort_keys=True) + "\n").encode())
    return {"kind": spec["kind"], "train_count": len(train), "validation_count": len(val), **quality}


# The batch that generators and the encoder run inference in (evaluations, the sweep's objective).
# On 2 CPU threads (benchmarks/inference_batch.py) 128 ran as fast per image as any batch tried,
# and 500 took 1.2x (32 px) to 1.5x (64 px) as long: larger batches' activations outgrow the cache.
INFERENCE_BATCH = 128


def encode(
    encoder: Encoder, images: torch.Tensor, batch: int = INFERENCE_BATCH
) -> tuple[np.ndarray, np.ndarray | None]:
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


def load_encoder(cfg: Config) -> tuple[Encoder, dict[str, Any], dict[str, np.ndarray]]:
    """(the encoder in eval mode, its spec, its reference arrays) from paths.encoder."""
    path = cfg.paths.encoder
    if not (path / SPEC).is_file():
        raise EvaluationError(f"{path}: no encoder here (missing {SPEC}); run `dvc repro encoder`")
    spec = json.loads((path / SPEC).read_text())
    if "validation_count" not in spec:
        raise EvaluationError(f"{path}: an encoder from before the validation/test split; run `dvc repro encoder`")
    if (spec["channels"], spec["image_size"]) != (cfg.data.channels, cfg.data.image_size):
        raise EvaluationError(
            f"{path}: encoder is for {spec['image_size']}px x{spec['channels']} images, the data is "
            f"{cfg.data.image_size}px x{cfg.data.channels}; run `dvc repro encoder`"
        )
    encoder = Encoder(spec["channels"], spec["image_size"], spec["feature_dim"], spec["num_classes"])
    encoder.load_state_dict(load_file(str(path / ENCODER_WEIGHTS)))  # safetensors: nothing unpickled
    encoder.eval()
    arrays = {k: v.numpy() for k, v in load_file(str(path / REFERENCE)).items()}
    return encoder, spec, arrays

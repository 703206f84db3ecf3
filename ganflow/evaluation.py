"""Sample quality without internet: a domain encoder trained on the real data, and GAN metrics
in its feature space, each reported next to its real-vs-real floor.

The encoder is a small CNN: a classifier when the data has labels (its penultimate layer gives
the features, its softmax the class predictions), otherwise an autoencoder (its bottleneck
gives the features). The real data is split once, by seed, into
  - a held-out part (20%) that scores the encoder (accuracy or reconstruction error);
  - reference half A: the features every generated set is compared with;
  - half B, disjoint from A, of the same size: B against A is the floor of every metric.
A metric near its floor means "as close to the real data as real data is to itself".
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
from ganflow.data import PreparedDataset
from ganflow.errors import GanflowError, first_line

WEIGHTS = "encoder.safetensors"
SPEC = "encoder.json"
REFERENCE = "reference.safetensors"  # half A's features and their mean/covariance


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


@dataclass
class Split:
    held_out: np.ndarray  # indices
    train: np.ndarray  # encoder training indices (everything not held out)
    half_a: np.ndarray  # reference
    half_b: np.ndarray  # floor, disjoint from half_a


def split_indices(n: int, sample_size: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_held = max(1, n // 5)
    held, train = np.sort(order[:n_held]), np.sort(order[n_held:])
    size = min(sample_size, n // 2)
    halves = rng.permutation(n)
    return Split(held, train, np.sort(halves[:size]), np.sort(halves[size : 2 * size]))


def fit_encoder(cfg: Config) -> dict[str, Any]:
    """The encoder stage: train the encoder, compute the reference and the floors, write
    paths.encoder (atomically). Returns the encoder's metrics."""
    dataset = PreparedDataset(cfg.paths.prepared)
    manifest = dataset.manifest
    labelled = bool(manifest["labelled"]) and len(manifest["class_names"]) >= 2
    if len(dataset) < 8:
        raise EvaluationError(f"{cfg.paths.prepared}: {len(dataset)} images are too few to fit an encoder (need 8)")
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])  # (N, C, S, S) in [-1, 1]
    labels = torch.as_tensor(dataset.labels, dtype=torch.long)
    split = split_indices(len(dataset), cfg.eval.num_samples, cfg.eval.seed)

    torch.manual_seed(cfg.eval.seed)
    num_classes = len(manifest["class_names"]) if labelled else 0
    encoder = Encoder(cfg.data.channels, cfg.data.image_size, cfg.eval.feature_dim, num_classes)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(cfg.eval.seed)
    train_idx = torch.as_tensor(split.train)
    for _ in range(cfg.eval.encoder_epochs):
        encoder.train()
        for batch in train_idx[torch.randperm(len(train_idx), generator=generator)].split(128):
            x = images[batch]
            _, out = encoder(x)
            # classifier: cross-entropy on the labels; autoencoder: reconstruct the input
            loss = nn.functional.cross_entropy(out, labels[batch]) if labelled else nn.functional.mse_loss(out, x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    encoder.eval()
    with torch.no_grad():
        train_features = torch.cat([encoder.body(x) for x in images[train_idx].split(500)])
        encoder.feature_scale.fill_(1.0 / float(train_features.var(dim=0).mean().sqrt().clamp_min(1e-8)))

    held = torch.as_tensor(split.held_out)
    with torch.no_grad():
        _, out = encoder(images[held])
    if labelled:
        quality = {"heldout_accuracy": float((out.argmax(1) == labels[held]).float().mean())}
    else:
        quality = {"heldout_reconstruction_mse": float(nn.functional.mse_loss(out, images[held]))}

    feats_a, probs_a = encode(encoder, images[torch.as_tensor(split.half_a)])
    feats_b, probs_b = encode(encoder, images[torch.as_tensor(split.half_b)])
    class_freq = (
        np.bincount(dataset.labels[dataset.labels >= 0], minlength=num_classes) / max(1, (dataset.labels >= 0).sum())
        if labelled else np.zeros(0)
    )
    reference = Reference(encoder, feats_a, *feature_stats(feats_a), class_freq, list(manifest["class_names"]), {}, cfg)
    floors = reference.metrics(feats_b, probs_b)
    spec = {
        "kind": "classifier" if labelled else "autoencoder",
        "channels": cfg.data.channels,
        "image_size": cfg.data.image_size,
        "feature_dim": cfg.eval.feature_dim,
        "num_classes": num_classes,
        "class_names": list(manifest["class_names"]) if labelled else [],
        "class_freq": class_freq.tolist(),
        "sample_size": int(len(split.half_a)),
        "floors": floors,
        "quality": quality,
        "data_hash": manifest["files"]["images.npy"],
    }
    with atomic_dir(cfg.paths.encoder) as tmp:
        save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(tmp / WEIGHTS))
        save_file(
            {"features": torch.from_numpy(feats_a), "mu": torch.from_numpy(reference.mu),
             "sigma": torch.from_numpy(reference.sigma)},
            str(tmp / REFERENCE),
        )
        write_bytes(tmp / SPEC, (json.dumps(spec, indent=2, sort_keys=True) + "\n").encode())
    return {"kind": spec["kind"], "sample_size": spec["sample_size"], **quality,
            **{f"floor_{k}": v for k, v in floors.items()}}


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


# ------------------------------------------------------------------------------------- metrics


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D)."""
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), the Fréchet distance of two Gaussians.

    tr((S1 S2)^1/2) is computed as tr((S1^1/2 S2 S1^1/2)^1/2), whose argument is symmetric
    positive semi-definite, so no complex parts or failed square roots on near-singular S.
    """
    root1 = _sqrtm_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt, 0.0))


def kid(real: np.ndarray, fake: np.ndarray, subsets: int = 50, subset_size: int = 500,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: the unbiased MMD^2 with kernel (x.y / D + 1)^3, averaged over
    random subsets. Returns (mean, standard deviation over subsets)."""
    rng = np.random.default_rng(seed)
    m = min(subset_size, len(real), len(fake))
    d = real.shape[1]
    values = []
    for _ in range(subsets):
        x = real[rng.choice(len(real), m, replace=False)]
        y = fake[rng.choice(len(fake), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        # unbiased: the diagonals k(x_i, x_i) are left out of the within-set terms
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(within - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


def _knn_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Distance of each point to its k-th nearest other point in the same set."""
    dist = _pairwise(features, features)
    return np.sort(dist, axis=1)[:, k]  # column 0 is the point itself


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.clip(sq, 0, None))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the
    union of balls reaching every sample's k-th nearest neighbour. Precision = share of fake
    samples inside the real manifold; recall = share of real samples inside the fake one."""
    real_radii, fake_radii = _knn_radii(real, k), _knn_radii(fake, k)
    dist = _pairwise(fake, real)  # (n_fake, n_real)
    precision = float((dist <= real_radii[None, :]).any(axis=1).mean())
    recall = float((dist.T <= fake_radii[None, :]).any(axis=1).mean())
    return precision, recall


def class_metrics(probs: np.ndarray, real_freq: np.ndarray) -> dict[str, float]:
    """From the classifier's probabilities on generated samples: classes covered (predicted at
    least once), KL(generated class frequencies || real ones), the largest relative deviation
    of a class's frequency, and the Inception-Score analogue exp(E_x KL(p(y|x) || p(y)))."""
    k = len(real_freq)
    counts = np.bincount(probs.argmax(1), minlength=k)
    freq = counts / counts.sum()
    present = freq > 0
    kl = float((freq[present] * np.log(freq[present] / np.clip(real_freq[present], 1e-12, None))).sum())
    marginal = probs.mean(0)
    eps = 1e-12
    score = float(np.exp((probs * (np.log(probs + eps) - np.log(marginal + eps))).sum(1).mean()))
    deviation = float(np.max(np.abs(freq - real_freq) / np.clip(real_freq, 1e-12, None)))
    return {"classes_covered": int(present.sum()), "class_kl": kl, "class_max_rel_dev": deviation,
            "is_domain": score}


@dataclass
class Reference:
    """What generated samples are measured against: the encoder and real half A."""

    encoder: Encoder
    features: np.ndarray  # (n, D) half A
    mu: np.ndarray
    sigma: np.ndarray
    class_freq: np.ndarray  # (K,) real class frequencies; empty when unlabelled
    class_names: list[str]
    floors: dict[str, float]
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

    def metrics(self, features: np.ndarray, probs: np.ndarray | None) -> dict[str, float]:
        """Every metric of a generated (or held-out real) set against half A."""
        out = self.quick(features)
        out["precision"], out["recall"] = precision_recall(self.features, features, self.cfg.eval.pr_k)
        if probs is not None and len(self.class_freq):
            out.update(class_metrics(probs, self.class_freq))
        return out


def load_reference(cfg: Config) -> Reference:
    path = cfg.paths.encoder
    if not (path / SPEC).is_file():
        raise EvaluationError(f"{path}: no encoder here (missing {SPEC}); run `dvc repro encoder`")
    spec = json.loads((path / SPEC).read_text())
    if (spec["channels"], spec["image_size"]) != (cfg.data.channels, cfg.data.image_size):
        raise EvaluationError(
            f"{path}: encoder is for {spec['image_size']}px x{spec['channels']} images, the data is "
            f"{cfg.data.image_size}px x{cfg.data.channels}; run `dvc repro encoder`"
        )
    encoder = Encoder(spec["channels"], spec["image_size"], spec["feature_dim"], spec["num_classes"])
    encoder.load_state_dict(load_file(str(path / WEIGHTS)))  # safetensors: nothing unpickled
    encoder.eval()
    ref = load_file(str(path / REFERENCE))
    return Reference(
        encoder, ref["features"].numpy(), ref["mu"].numpy(), ref["sigma"].numpy(),
        np.asarray(spec["class_freq"]), spec["class_names"], spec["floors"], cfg,
    )


def with_floors(metrics: dict[str, float], floors: dict[str, float]) -> dict[str, Any]:
    """Metrics next to their floors, plus fd_domain / floor."""
    out: dict[str, Any] = dict(metrics)
    out.update({f"floor_{k}": v for k, v in floors.items() if k in metrics})
    if floors.get("fd_domain"):
        out["fd_domain_over_floor"] = metrics["fd_domain"] / floors["fd_domain"]
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


def evaluate_generator(cfg: Config, sample_fn, reference: Reference | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """Every metric of ``sample_fn(z) -> images (N, C, S, S) in [-1, 1]`` against the real
    reference, next to its floor. Returns (metrics, the samples as uint8 (N, S, S, C)).

    The latent vectors are drawn with eval.seed + 1, not the eval.seed that picked the best
    epoch during training, so the selection does not flatter the final figure.
    """
    from ganflow.sampling import to_uint8

    reference = reference if reference is not None else load_reference(cfg)
    n = reference.sample_size
    latent = _latent_dim(cfg)
    z = torch.randn(n, latent, generator=torch.Generator().manual_seed(cfg.eval.seed + 1))
    images = torch.cat([torch.as_tensor(sample_fn(chunk)) for chunk in z.split(500)]).float()
    features, probs = encode(reference.encoder, images)
    metrics = with_floors(reference.metrics(features, probs), reference.floors)
    metrics["sample_size"] = n
    if probs is not None:
        counts = np.bincount(probs.argmax(1), minlength=len(reference.class_names))
        metrics["class_freq"] = {name: float(c / n) for name, c in zip(reference.class_names, counts)}
    if cfg.eval.inception_weights is not None:
        dataset = PreparedDataset(cfg.paths.prepared)
        half_a = split_indices(len(dataset), cfg.eval.num_samples, cfg.eval.seed).half_a
        real = torch.stack([dataset[int(i)][0] for i in half_a])
        metrics["fid_inception"] = inception_fid(cfg.eval.inception_weights, real, images)
    return metrics, to_uint8(images)


def _latent_dim(cfg: Config) -> int:
    spec = json.loads((cfg.paths.generator / "generator.json").read_text())
    return int(spec["latent_dim"])

"""The evaluation protocol: every quality figure of ganflow, measured the same way everywhere.

A figure is always read against a real baseline drawn the same way, with its spread:
  - the reference is one split: validation (what chooses: the exported epoch, the sweep, the
    champion) or test (what reports; only the evaluate stage and `ganflow score` read it);
  - a draw is n samples with the reference's class counts times a multiple k (as large as the
    train split can match twice over, n <= eval.num_samples), so G and the baseline carry the
    same finite-sample bias and no class-count noise;
  - the real baseline is eval.draws draws of train images with exactly those counts; the
    generator is eval.draws latent draws with exactly those classes (a conditional G is asked
    for them; an unconditional G just draws n);
  - every metric is the mean and sd over draws, next to real_<metric> (mean and sd), and
    fd_domain_over_real = fd_domain / real_fd_domain. A ratio near 1 means "as far from the held-
    out images as other real images are"; it is not a bound, and at small n both carry bias.
The copy detector (ganflow.copying) flags samples that repeat training images, in part or shifted.
Metrics a split is too small for are left out and named in ``not_computed``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ganflow.config import Config
from ganflow.copying import Detector, build_detector
from ganflow.dataset import PreparedDataset
from ganflow.encoder import INFERENCE_BATCH, Encoder, EvaluationError, encode, load_encoder
from ganflow.errors import first_line
from ganflow.metrics import (
    class_metrics,
    fd,
    feature_stats,
    frechet_distance,
    kid,
    kid_subset,
    pairwise,
    per_class_fd,
    precision_recall,
    radial_power,
    spectrum_gap,
)

HEADLINE = ("fd_domain", "kid", "precision", "recall")  # each with its sd and its real baseline


@dataclass
class Split:
    """One reference split: its features, labels and the draw every set is compared at."""

    name: str  # "validation" or "test"
    features: np.ndarray  # (m, D)
    labels: np.ndarray  # (m,) class index, -1 when unlabelled
    draw_counts: np.ndarray  # (K,) per class (one entry when unlabelled): the reference's counts x k

    @property
    def draw_size(self) -> int:
        return int(self.draw_counts.sum())


@dataclass
class Reference:
    """The encoder and the real images every generated set is measured against."""

    encoder: Encoder
    spec: dict[str, Any]
    split: Split  # the validation split (train loop, sweep) unless a caller asks for test
    train_features: np.ndarray  # (M, D)
    train_labels: np.ndarray  # (M,)
    train_index: np.ndarray  # (M,) their indices in the train part
    cells: np.ndarray  # (k, D) the copy detector's partition
    class_freq: np.ndarray  # (K,) train class frequencies; empty when unlabelled
    class_names: list[str]
    cfg: Config

    @property
    def sample_size(self) -> int:
        return self.split.draw_size

    @property
    def labelled(self) -> bool:
        return len(self.class_names) > 0

    def quick(self, features: np.ndarray, asked: np.ndarray | None = None) -> dict[str, float]:
        """The in-training metrics on the validation split: fd_domain and KID; for a conditional G
        (``asked``: the class each sample was drawn for) also fd_class."""
        kid_mean, kid_std = kid(
            self.split.features, features, self.cfg.eval.kid_subsets, self.cfg.eval.kid_subset_size, self.cfg.eval.seed
        )
        out = {"fd_domain": fd(self.split.features, features), "kid": kid_mean, "kid_std": kid_std}
        if asked is not None and self.labelled:
            out["fd_class"] = fd_class(self.split.features, self.split.labels, features, asked)
        return out

    def with_split(self, split: Split) -> Reference:
        return Reference(
            self.encoder,
            self.spec,
            split,
            self.train_features,
            self.train_labels,
            self.train_index,
            self.cells,
            self.class_freq,
            self.class_names,
            self.cfg,
        )


def draw_counts(train_labels: np.ndarray, ref_labels: np.ndarray, classes: int, cap: int) -> np.ndarray:
    """Class counts of one draw: the reference's counts times the largest k for which the train
    split holds every class at least twice over (so that real draws differ), at most ``cap``
    samples in all, and k >= 1."""
    if classes == 0:
        ref, train = np.asarray([len(ref_labels)]), np.asarray([len(train_labels)])
    else:
        ref = np.bincount(ref_labels, minlength=classes)
        train = np.bincount(train_labels, minlength=classes)
    present = ref > 0
    k = int(np.min(train[present] // (2 * ref[present]))) if present.any() else 1
    k = max(1, min(k, cap // max(1, int(ref.sum()))))
    return ref * k


def make_split(
    name: str, features: np.ndarray, labels: np.ndarray, reference_train_labels: np.ndarray, classes: int, cfg: Config
) -> Split:
    return Split(name, features, labels, draw_counts(reference_train_labels, labels, classes, cfg.eval.num_samples))


def load_reference(cfg: Config) -> Reference:
    """The encoder and the validation reference (the encoder stage's outputs; no test images)."""
    encoder, spec, arrays = load_encoder(cfg)
    classes = int(spec["num_classes"])
    split = make_split(
        "validation", arrays["validation_features"], arrays["validation_labels"], arrays["train_labels"], classes, cfg
    )
    return Reference(
        encoder,
        spec,
        split,
        arrays["train_features"],
        arrays["train_labels"],
        arrays["train_index"],
        arrays["cells"],
        np.asarray(spec["class_freq"]),
        list(spec["class_names"]),
        cfg,
    )


def test_split(reference: Reference) -> tuple[Split, np.ndarray]:
    """The test split (its Split and its images uint8 (m, H, W, C)): read here only, for the
    evaluate stage and `ganflow score`."""
    data = PreparedDataset(reference.cfg.paths.prepared, part="test")
    if len(data) < 2:
        raise EvaluationError(
            f"{reference.cfg.paths.prepared}: the test split has {len(data)} images (need 2); "
            "raise data.test_fraction or add images"
        )
    images, labels = data.tensors()
    features, _ = encode(reference.encoder, images)
    split = make_split(
        "test", features, labels.numpy(), reference.train_labels, len(reference.class_names), reference.cfg
    )
    return split, data.images.read_many(data.indices)


# ------------------------------------------------------------------------------------- one draw


def draw_metrics(reference: Reference, features: np.ndarray, probs: np.ndarray | None) -> dict[str, Any]:
    """Every metric of one drawn set (generated or real) against reference.split."""
    split, cfg = reference.split, reference.cfg
    out: dict[str, Any] = {
        "fd_domain": fd(split.features, features) if min(len(features), len(split.features)) >= 2 else float("nan")
    }
    out["kid"], _ = kid(split.features, features, cfg.eval.kid_subsets, cfg.eval.kid_subset_size, cfg.eval.seed)
    out["precision"], out["recall"] = precision_recall(split.features, features, cfg.eval.pr_k)
    if probs is not None and reference.labelled:
        out.update(class_metrics(probs, reference.class_freq))
        out["class_fd"] = per_class_fd(split.features, split.labels, features, probs.argmax(1), reference.class_names)
    return out


def summarize(draws: list[dict[str, Any]], prefix: str = "") -> dict[str, Any]:
    """Mean and sd over draws of every scalar metric (``<key>``, ``<key>_sd``), and the mean of
    each class's Fréchet distance (None where a class had too few samples in some draw)."""
    out: dict[str, Any] = {}
    for key, value in draws[0].items():
        if isinstance(value, (int, float)):
            values = np.asarray([d[key] for d in draws], dtype=np.float64)
            out[prefix + key] = float(values.mean())
            out[prefix + key + "_sd"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
    if "class_fd" in draws[0]:
        out[prefix + "class_fd"] = {
            name: (
                float(np.mean([d["class_fd"][name] for d in draws]))
                if all(d["class_fd"][name] is not None for d in draws)
                else None
            )
            for name in draws[0]["class_fd"]
        }
    return out


def real_draw_indices(reference: Reference, draws: int, seed: int) -> list[np.ndarray]:
    """The real baseline's draws: ``draws`` index arrays into the train features, each with the
    draw's exact class counts."""
    rng = np.random.default_rng(seed)
    counts = reference.split.draw_counts
    out = []
    for _ in range(draws):
        if reference.labelled:
            index = np.concatenate(
                [
                    rng.choice(
                        np.flatnonzero(reference.train_labels == c),
                        int(n),
                        replace=int(n) > int((reference.train_labels == c).sum()),
                    )
                    for c, n in enumerate(counts)
                    if n > 0
                ]
            )
        else:
            index = rng.choice(
                len(reference.train_features), int(counts[0]), replace=int(counts[0]) > len(reference.train_features)
            )
        out.append(index)
    return out


def real_draws(reference: Reference, draws: int, seed: int) -> list[dict[str, Any]]:
    """The real baseline: ``draws`` sets of train images with the draw's exact class counts."""
    probs_all = None
    if reference.labelled:
        # the classifier's probabilities on the train features: the head on the stored features
        with torch.no_grad():
            scale = reference.encoder.feature_scale
            logits = reference.encoder.head(torch.as_tensor(reference.train_features, dtype=torch.float32) / scale)
            probs_all = torch.softmax(logits.double(), dim=1).numpy()
    return [
        draw_metrics(reference, reference.train_features[index], None if probs_all is None else probs_all[index])
        for index in real_draw_indices(reference, draws, seed)
    ]


def spectra(
    reference: Reference,
    reference_images: np.ndarray,
    train_images: np.ndarray,
    generated: list[np.ndarray],
    seed: int,
) -> dict[str, float]:
    """The pixel check beside the encoder's: each generated draw's radial power spectrum against
    the reference images', and the same for the real baseline's draws of ``train_images`` (the
    reference's train images, images_of; the indices real_draws uses), as mean and sd over
    draws, with their ratio."""
    target = radial_power(reference_images)
    ours = np.asarray([spectrum_gap(radial_power(images), target) for images in generated])
    real = np.asarray(
        [
            spectrum_gap(radial_power(train_images[index]), target)[0]
            for index in real_draw_indices(reference, len(generated), seed)
        ]
    )
    ddof = 1 if len(generated) > 1 else 0
    out = {
        "spectrum_gap": float(ours[:, 0].mean()),
        "spectrum_gap_sd": float(ours[:, 0].std(ddof=ddof)),
        "spectrum_hf_shift": float(ours[:, 1].mean()),
        "real_spectrum_gap": float(real.mean()),
        "real_spectrum_gap_sd": float(real.std(ddof=ddof)),
    }
    out.update(
        over_real(
            "spectrum_gap",
            out,
            {"spectrum_gap": out["real_spectrum_gap"], "spectrum_gap_sd": out["real_spectrum_gap_sd"]},
        )
    )
    return out


def mean_pairwise_distance(x: np.ndarray) -> float:
    """The mean Euclidean distance between two different rows of ``x`` (N, ...)."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    if len(flat) < 2:
        return float("nan")
    d = pairwise(flat, flat)
    return float((d.sum() - np.trace(d)) / (len(flat) * (len(flat) - 1)))


def diversity(
    reference: Reference,
    train_images: np.ndarray,
    generated: list[tuple[np.ndarray, np.ndarray]],
    seed: int,
) -> dict[str, float]:
    """How varied the samples are: the mean distance between two samples of a draw, in the
    encoder's features (``diversity``) and in pixels (``diversity_pixel``, no encoder involved),
    against the same of the real baseline's draws of train images (the indices real_draws uses).
    Mean and sd over draws, and the ratio: near 1 = as varied as real images; a collapsed G reads
    far below, a noisy one can read above in pixels. ``generated``: [(features, uint8 images)]."""
    index = real_draw_indices(reference, len(generated), seed)
    pairs = {
        "diversity": ([f for f, _ in generated], [reference.train_features[i] for i in index]),
        "diversity_pixel": (
            [images.astype(np.float64) / 255.0 for _, images in generated],
            [train_images[i].astype(np.float64) / 255.0 for i in index],
        ),
    }
    ddof = 1 if len(generated) > 1 else 0
    out: dict[str, float] = {}
    for key, (ours, real) in pairs.items():
        g = np.asarray([mean_pairwise_distance(x) for x in ours])
        r = np.asarray([mean_pairwise_distance(x) for x in real])
        stats = {key: float(g.mean()), f"{key}_sd": float(g.std(ddof=ddof))}
        real_stats = {key: float(r.mean()), f"{key}_sd": float(r.std(ddof=ddof))}
        out.update(stats)
        out.update({f"real_{k}": v for k, v in real_stats.items()})
        out.update(over_real(key, stats, real_stats))
    return out


def over_real(key: str, generated: dict[str, Any], real: dict[str, Any]) -> dict[str, float]:
    """``<key>_over_real`` and its sd (delta method) from the generated and real means and sds;
    empty when either mean is not finite or the real one is not positive."""
    g, r = generated.get(key, float("nan")), real.get(key, float("nan"))
    if not (np.isfinite(g) and np.isfinite(r) and r > 0):
        return {}
    rel = np.hypot(generated[f"{key}_sd"] / g if g > 0 else 0.0, real[f"{key}_sd"] / r)
    return {f"{key}_over_real": float(g / r), f"{key}_over_real_sd": float(g / r * rel)}


def compare(generated: dict[str, Any], real: dict[str, Any]) -> dict[str, Any]:
    """The generated summary next to the real one, with fd_domain_over_real (and its sd, by the
    delta method) and class_fd_over_real per class."""
    out = dict(generated)
    out.update({f"real_{k}": v for k, v in real.items() if not k.startswith("class_fd")})
    out.update(over_real("fd_domain", generated, real))
    if "class_fd" in generated and "class_fd" in real:
        ratios = {
            name: (v / real["class_fd"][name] if v is not None and real["class_fd"].get(name) else None)
            for name, v in generated["class_fd"].items()
        }
        out["class_fd_over_real"] = ratios
        known = [r for r in ratios.values() if r is not None]
        # the weakest class; null when a class is never drawn (classes_covered says which are)
        out["class_fd_over_real_max"] = max(known) if known and len(known) == len(ratios) else None
    return out


def not_computed(split: Split, cfg: Config) -> dict[str, str]:
    """The metrics a split is too small for, with the reason (their values are null)."""
    m, d = len(split.features), split.features.shape[1]
    out = {}
    if m <= d:
        out["fd_domain"] = (
            f"{split.name} has {m} images, no more than eval.feature_dim={d}: the covariance is "
            "rank-deficient, so fd_domain is dominated by estimator bias (computed, read with care)"
        )
    if min(m, split.draw_size) < 4:
        out["kid"] = f"{split.name} has {m} images: KID needs at least 4"
    if min(m, split.draw_size) <= cfg.eval.pr_k:
        out["precision"] = out["recall"] = f"{split.name} has {m} images: k-NN manifolds need more than eval.pr_k"
    return out


# ------------------------------------------------------------------------------------- a whole evaluation


def finite(value: Any) -> Any:
    """The metrics with every non-finite float as None: eval.json stays strict JSON (DVC and
    other readers refuse NaN), and a figure that could not be computed reads as null."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def score(reference: Reference, draws: list[tuple[np.ndarray, np.ndarray | None]], seed: int) -> dict[str, Any]:
    """Generated draws [(features, probs)] against reference.split and its real baseline."""
    generated = summarize([draw_metrics(reference, f, p) for f, p in draws])
    real = summarize(real_draws(reference, len(draws), seed))
    out = compare(generated, real)
    out.update(
        {
            "split": reference.split.name,
            "draws": len(draws),
            "sample_size": reference.split.draw_size,
            "reference_size": len(reference.split.features),
            "kid_subset_size": kid_subset(
                reference.cfg.eval.kid_subset_size, len(reference.split.features), reference.split.draw_size
            ),
        }
    )
    skipped = not_computed(reference.split, reference.cfg)
    if skipped:
        out["not_computed"] = skipped
    return out


def images_of(reference: Reference) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, H, W, C) images of the reference's train features (in their order) and of the
    validation split: read once, for the spectrum and the copy detector."""
    train = PreparedDataset(reference.cfg.paths.prepared, part="train")
    val = PreparedDataset(reference.cfg.paths.prepared, part="validation")
    return train.images.read_many(train.indices[reference.train_index]), val.images.read_many(val.indices)


def detector(
    reference: Reference, test: Split, test_images: np.ndarray, train_images: np.ndarray, val_images: np.ndarray
) -> Detector:
    """The copy detector: the train images of the reference, held-out = validation + test."""
    held_images = np.concatenate([val_images, test_images])
    held_features = np.concatenate([reference.split.features, test.features])
    return build_detector(
        reference.train_features, train_images, held_features, held_images, reference.cells, reference.cfg.eval.seed
    )


def codes_for(split: Split, latent_dim: int, conditional: bool, generator: torch.Generator) -> torch.Tensor:
    """One draw's inputs for G: latent vectors, and for a conditional G one-hot classes with the
    draw's exact counts."""
    from ganflow.models import one_hot

    z = torch.randn(split.draw_size, latent_dim, generator=generator)
    if not conditional:
        return z
    classes = torch.repeat_interleave(torch.arange(len(split.draw_counts)), torch.as_tensor(split.draw_counts))
    return torch.cat([z, one_hot(classes, len(split.draw_counts))], dim=1)


def fd_class(real: np.ndarray, real_labels: np.ndarray, fake: np.ndarray, asked: np.ndarray) -> float:
    """The mean over classes of the Fréchet distance between the real images of a class and the
    samples a conditional G drew for it (intra-class FD, as cGAN papers report intra-FID). Unlike
    fd_domain over all classes, it rises when G draws a good image of the wrong class. Classes
    with fewer than 2 images on either side are left out; nan when none is left."""
    values = [
        fd(real[real_labels == c], fake[asked == c])
        for c in np.unique(real_labels)
        if (real_labels == c).sum() >= 2 and (asked == c).sum() >= 2
    ]
    return float(np.mean(values)) if values else float("nan")


def class_match(probs: np.ndarray, asked: np.ndarray, spec: dict[str, Any]) -> dict[str, float]:
    """The share of a conditional G's samples that the encoder's classifier puts in the class G
    was asked for, next to the classifier's accuracy on validation images (real_class_match). The
    class frequencies alone cannot tell a G that draws the wrong digit for each class at the right
    overall rates."""
    out = {"class_match": float((probs.argmax(1) == asked).mean())}
    accuracy = spec.get("quality", {}).get("validation_accuracy")
    if accuracy is not None:
        out["real_class_match"] = float(accuracy)
    return out


def evaluate_generator(
    cfg: Config,
    sample_fn: Callable[[torch.Tensor], torch.Tensor],
    meta: dict[str, Any],
    reference: Reference | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """Every metric of ``sample_fn(codes) -> images (N, C, S, S) in [-1, 1]`` on the test split
    (the top level of the result) and on the validation split (``validation``: what the registry
    chooses the champion by), each over eval.draws latent draws next to its real baseline, and
    the copy detector. Returns (metrics, the first test draw as uint8 (N, S, S, C)).

    The latent draws use seeds from eval.seed + 1 on, never the vectors the training chose its
    epoch with."""
    from ganflow.images import to_uint8

    reference = reference if reference is not None else load_reference(cfg)
    test, test_images = test_split(reference)
    conditional = bool(meta["class_prior"])

    def generate(split: Split, seed: int) -> tuple[np.ndarray, np.ndarray | None, torch.Tensor, torch.Tensor]:
        codes = codes_for(split, meta["latent_dim"], conditional, torch.Generator().manual_seed(seed))
        images = torch.cat([torch.as_tensor(sample_fn(chunk)) for chunk in codes.split(INFERENCE_BATCH)]).float()
        features, probs = encode(reference.encoder, images)
        return features, probs, images, codes

    results: dict[str, Any] = {}
    first: tuple[np.ndarray, np.ndarray | None, torch.Tensor, torch.Tensor] | None = None
    test_draws: list[tuple[np.ndarray, np.ndarray]] = []  # (features, uint8 images): spectrum, diversity
    for split, base in ((reference.split, 1000), (test, 1)):
        draws = []
        for i in range(cfg.eval.draws):
            features, probs, images, codes = generate(split, cfg.eval.seed + base + i)
            draws.append((features, probs))
            if split is test:
                test_draws.append((features, to_uint8(images)))
                if i == 0:
                    first = (features, probs, images, codes)
        results[split.name] = score(reference.with_split(split), draws, cfg.eval.seed + base)
    metrics: dict[str, Any] = results["test"]
    train_images, val_images = images_of(reference)
    test_ref = reference.with_split(test)
    metrics.update(spectra(test_ref, test_images, train_images, [i for _, i in test_draws], cfg.eval.seed + 1))
    metrics.update(diversity(test_ref, train_images, test_draws, cfg.eval.seed + 1))
    metrics["validation"] = {k: v for k, v in results["validation"].items() if not isinstance(v, dict)}
    assert first is not None
    features, probs, images, codes = first
    samples = to_uint8(images)
    metrics.update(detector(reference, test, test_images, train_images, val_images).check(features, samples))
    if probs is not None:
        counts = np.bincount(probs.argmax(1), minlength=len(reference.class_names))
        metrics["class_freq"] = {name: float(c / len(probs)) for name, c in zip(reference.class_names, counts)}
        if conditional:  # does it draw the class it is asked for?
            metrics.update(class_match(probs, codes[:, meta["latent_dim"] :].argmax(1).numpy(), reference.spec))
    if cfg.eval.inception_weights is not None:
        real = torch.from_numpy(test_images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        metrics["fid_inception"] = inception_fid(cfg.eval.inception_weights, real, images)
    metrics["eval_dtype"] = "float32"
    return finite(metrics), samples


def score_images(cfg: Config, images: np.ndarray, labels: np.ndarray | None, split_name: str) -> dict[str, Any]:
    """`ganflow score`: a fixed set of samples (uint8 (N, H, W, C), optional class per sample)
    scored exactly as the evaluate stage scores a generator: cut into as many draws of the
    split's draw size (with its class counts, where labels are given) as the samples fill."""
    reference = load_reference(cfg)
    size, channels = cfg.data.image_size, cfg.data.channels
    if images.ndim != 4 or images.shape[1:] != (size, size, channels) or images.dtype != np.uint8:
        raise EvaluationError(
            f"samples: expected uint8 images of shape (N, {size}, {size}, {channels}) as "
            f"data.* prepares them, got {images.dtype} {tuple(images.shape)}"
        )
    test, test_images = test_split(reference)
    split = test if split_name == "test" else reference.split
    rng = np.random.default_rng(cfg.eval.seed)
    by_class = labels is not None and reference.labelled
    if by_class:
        if labels.shape != (len(images),) or labels.min() < 0 or labels.max() >= len(reference.class_names):
            raise EvaluationError(
                f"samples: labels must be {len(images)} class indices in 0..{len(reference.class_names) - 1}"
            )
    # fewer samples than a draw: draws (and the real baseline's) at the largest multiple they fill
    k = split.draw_size // len(split.features)
    own = (
        np.bincount(split.labels, minlength=len(reference.class_names))
        if reference.labelled
        else np.asarray([len(split.features)])
    )
    if by_class:
        have = np.bincount(labels, minlength=len(own))
        fill = int(min(have[c] // own[c] for c in range(len(own)) if own[c] > 0))
    else:
        fill = len(images) // int(own.sum())
    if 1 <= fill < k:
        split = Split(split.name, split.features, split.labels, own * fill)
    if by_class:
        pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(len(split.draw_counts))]
        fills = [len(p) // n for p, n in zip(pools, split.draw_counts) if n > 0]
        count = min(fills)
        index = [
            np.concatenate([p[i * n : (i + 1) * n] for p, n in zip(pools, split.draw_counts) if n > 0])
            for i in range(count)
        ]
    else:
        order = rng.permutation(len(images))
        count = len(images) // split.draw_size
        index = [order[i * split.draw_size : (i + 1) * split.draw_size] for i in range(count)]
    if count < 1:
        raise EvaluationError(
            f"samples: {len(images)} images fill no draw of {split.draw_size} "
            f"(the {split.name} split's class counts x {split.draw_size // len(split.features)})"
        )
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    features, probs = encode(reference.encoder, x)
    draws = [(features[i], None if probs is None else probs[i]) for i in index]
    seed = cfg.eval.seed + (1 if split is test else 1000)
    metrics = score(reference.with_split(split), draws, seed)
    train_images, val_images = images_of(reference)
    reference_images = test_images if split is test else val_images
    generated = [images[i] for i in index]
    metrics.update(spectra(reference.with_split(split), reference_images, train_images, generated, seed))
    metrics.update(
        diversity(reference.with_split(split), train_images, [(features[i], images[i]) for i in index], seed)
    )
    detect = detector(reference, test, test_images, train_images, val_images)
    metrics.update(detect.check(features[index[0]], images[index[0]]))
    metrics["eval_dtype"] = "float32"
    return finite(metrics)


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
        raise EvaluationError(
            f"eval.inception_weights: {weights} is not a TorchScript model ({first_line(exc)})"
        ) from None
    fr, ff = inception_features(model, real), inception_features(model, fake)
    return frechet_distance(*feature_stats(fr), *feature_stats(ff))

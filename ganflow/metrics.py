"""The GAN metrics, as pure functions of encoder features (no models, no files).

Every function takes features (N, D) float64 from the domain encoder (ganflow.evaluation) and
returns plain floats, except the power spectrum (radial_power, spectrum_gap), which reads pixels:
it needs no encoder, so it cannot share an encoder's blind spots. What each number means, and
which way is better, is in METRICS below (the README's metric table says the same for users).
"""

from __future__ import annotations

import numpy as np

# name -> (meaning, better). The evaluate stage writes these keys into metrics/eval.json, each
# as the mean over latent draws with its sd (``<name>_sd``) and its real baseline (``real_<name>``,
# train images drawn with the reference's class counts, as often); see ganflow.evaluation.
METRICS: dict[str, tuple[str, str]] = {
    "fd_domain": ("Fréchet distance between the reference split's real features and the generated ones", "lower"),
    "fd_domain_over_real": (
        "fd_domain / real_fd_domain: the generator's distance in units of real images' own",
        "lower; ≈ 1 = as close to the reference as real train images are",
    ),
    "kid": ("kernel (MMD²) distance, unbiased (can be < 0); subsets of at most half of either set", "lower"),
    "precision": ("share of generated samples inside the reference's real manifold (k-NN balls)", "higher"),
    "recall": ("share of reference images inside the generated manifold; low = mode collapse", "higher"),
    "classes_covered": ("classes the encoder's classifier sees in the generated samples", "all"),
    "class_kl": ("KL(generated class frequencies ‖ real ones)", "lower, ≈ 0"),
    "class_kl_reverse": ("KL(real class frequencies ‖ generated ones): large when a class is dropped", "lower, ≈ 0"),
    "class_tv": (
        "total-variation distance of the class frequencies (share of samples in the wrong class)",
        "lower, ≈ 0",
    ),
    "class_max_rel_dev": ("largest relative deviation of a class's frequency", "lower"),
    "class_fd_over_real": ("per class: its Fréchet distance / the real baseline's; names the weak classes", "lower"),
    "is_domain": ("Inception-Score analogue with the domain classifier", "higher, up to the number of classes"),
    "spectrum_gap": (
        "mean |difference| of the log10 radial power spectra of generated and reference images, in "
        "decades: blobs (too smooth) and checkerboard or noise patterns (too much fine detail) both raise it",
        "lower; compare with real_spectrum_gap",
    ),
    "spectrum_hf_shift": (
        "mean log10 power difference over the upper half of the frequencies: < 0 smoother than real, "
        "> 0 a fine pattern real images lack",
        "≈ 0",
    ),
    "copying_flagged": ("1 when the copy detector (ganflow.copying) flags the samples: never champion", "0"),
}


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


def fd(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between two feature sets (N, D), (M, D)."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def kid_subset(subset_size: int, n_real: int, n_fake: int) -> int:
    """The KID subset size: at most half of either set, so that subsets differ (at least 2)."""
    return max(2, min(subset_size, n_real // 2, n_fake // 2))


def kid(
    real: np.ndarray, fake: np.ndarray, subsets: int = 50, subset_size: int = 500, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance: the unbiased MMD^2 with kernel (x.y / D + 1)^3, averaged over
    random subsets of ``kid_subset(...)`` samples each. Returns (mean, standard deviation over
    subsets); nan when either set has fewer than 4 samples."""
    if min(len(real), len(fake)) < 4:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    m = kid_subset(subset_size, len(real), len(fake))
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


def pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances (len(a), len(b))."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.clip(sq, 0, None))


def nearest_distance(points: np.ndarray, to: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Distance of each point (N, D) to its nearest neighbour in ``to`` (M, D); memory O(chunk x M)."""
    return np.concatenate([pairwise(points[i : i + chunk], to).min(axis=1) for i in range(0, len(points), chunk)])


def _knn_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Distance of each point to its k-th nearest other point in the same set."""
    return np.sort(pairwise(features, features), axis=1)[:, k]  # column 0 is the point itself


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the
    union of balls reaching every sample's k-th nearest neighbour. Precision = share of fake
    samples inside the real manifold; recall = share of real samples inside the fake one. nan
    when either set has k or fewer samples (no k-th neighbour)."""
    if min(len(real), len(fake)) <= k:
        return float("nan"), float("nan")
    real_radii, fake_radii = _knn_radii(real, k), _knn_radii(fake, k)
    dist = pairwise(fake, real)  # (n_fake, n_real)
    precision = float((dist <= real_radii[None, :]).any(axis=1).mean())
    recall = float((dist.T <= fake_radii[None, :]).any(axis=1).mean())
    return precision, recall


def class_metrics(probs: np.ndarray, real_freq: np.ndarray) -> dict[str, float]:
    """From the classifier's probabilities on generated samples (N, K) and the real class
    frequencies (K,): classes covered (predicted at least once), KL in both directions, the
    total-variation distance, the largest relative deviation of a class's frequency, and the
    Inception-Score analogue exp(E_x KL(p(y|x) || p(y))).

    KL(generated || real) barely moves when a class is missing (the missing class adds 0 to the
    sum); KL(real || generated) is the one that sees it. It is computed on frequencies smoothed
    by half a sample per class, so a dropped class costs a large but finite amount.
    """
    n, k = probs.shape
    counts = np.bincount(probs.argmax(1), minlength=k)
    freq = counts / counts.sum()
    present = freq > 0
    real = np.clip(real_freq, 1e-12, None)
    kl = float((freq[present] * np.log(freq[present] / real[present])).sum())
    smoothed = (counts + 0.5) / (n + 0.5 * k)
    has_real = real_freq > 0
    kl_reverse = float((real_freq[has_real] * np.log(real_freq[has_real] / smoothed[has_real])).sum())
    marginal = probs.mean(0)
    eps = 1e-12
    score = float(np.exp((probs * (np.log(probs + eps) - np.log(marginal + eps))).sum(1).mean()))
    return {
        "classes_covered": int(present.sum()),
        "class_kl": kl,
        "class_kl_reverse": kl_reverse,
        "class_tv": float(0.5 * np.abs(freq - real_freq).sum()),
        "class_max_rel_dev": float(np.max(np.abs(freq - real_freq) / real)),
        "is_domain": score,
    }


def per_class_fd(
    real: np.ndarray, real_labels: np.ndarray, fake: np.ndarray, fake_labels: np.ndarray, names: list[str]
) -> dict[str, float | None]:
    """Fréchet distance per class between real features of that class and the generated features
    the classifier assigns to it. None where either side has fewer than 2 samples (a covariance
    needs two)."""
    out: dict[str, float | None] = {}
    for i, name in enumerate(names):
        a, b = real[real_labels == i], fake[fake_labels == i]
        out[name] = fd(a, b) if len(a) >= 2 and len(b) >= 2 else None
    return out


def nearest_distance_index(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest centre of each point."""
    return pairwise(points, centres).argmin(axis=1)


def kmeans_cells(features: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k centres (k, D) partitioning the feature space (k-means, seeded: the same every run)."""
    from sklearn.cluster import KMeans

    k = max(1, min(k, len(features)))
    return KMeans(n_clusters=k, n_init=4, random_state=seed).fit(features).cluster_centers_.astype(np.float64)


def radial_power(images: np.ndarray) -> np.ndarray:
    """log10 of the mean power per radial frequency band (1 .. S/2 cycles per image) of images
    (N, S, S, C) uint8, their channels averaged and each image's mean removed."""
    x = images.astype(np.float64).mean(axis=-1) / 255.0
    x -= x.mean(axis=(1, 2), keepdims=True)
    power = (np.abs(np.fft.fft2(x)) ** 2).mean(axis=0)
    side = x.shape[1]
    freq = np.fft.fftfreq(side)
    band = np.minimum(np.rint(np.hypot(freq[:, None], freq[None, :]) * side).astype(int), side // 2)
    total = np.bincount(band.ravel(), power.ravel(), minlength=side // 2 + 1)
    per_band = total / np.bincount(band.ravel(), minlength=side // 2 + 1)
    return np.log10(per_band[1:] + 1e-12)


def spectrum_gap(profile: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(mean |difference| over all bands, mean difference over the upper half) of two
    radial_power profiles, in decades of power."""
    diff = profile - reference
    return float(np.abs(diff).mean()), float(diff[len(diff) // 2 :].mean())

"""The copy detector: does a generator return its training images, wholly, in part, or shifted?

Three statistics of L(x), the distance of a sample x to its nearest training image, each read
against held-out real images (validation and test: never trained on, so they show what "new"
looks like):

  near_dup_pixel    share of samples nearer to a training image, in pixels, than the 1st
                    percentile of held-out images' L. Pixel distances are shift-tolerant: the
                    smallest RMS difference over translations of up to SHIFT pixels (at <= 32 px),
                    so a copy moved by 1-2 px is still a copy.
  near_dup_feature  the same in the domain encoder's feature space.
  min_cell_z        the data-copying test of Meehan, Chaudhuri & Dasgupta (AISTATS 2020) cell by
                    cell: in each cell of a k-means partition of the training features, the
                    Mann-Whitney Z of L(generated) against L(held-out). The worst (lowest) cell
                    decides, so a generator that copies one region is not averaged away.

The thresholds are not fixed numbers. For the two rates the null is exact: if the samples were
exchangeable with the held-out images, the count of n samples below the j-th smallest of m
held-out distances follows a known law (the number of samples ranked before the j-th held-out
one in a random order), so the threshold is its ALPHA tail at the actual n and m; it holds at 30
held-out images as at 500 (a permutation null of held-out halves gave 50 % at 100 images, which a
30 % copier passed). The cell Z's threshold comes from a permutation null of held-out halves
scored against each other exactly as samples are. A sample set is flagged when any statistic
passes its threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ganflow.metrics import nearest_distance, nearest_distance_index

SHIFT = 2  # pixels of translation (at the <= 32 px view) a copy may be moved by and still match
VIEW = 32  # pixel distances are computed at most at this side length (area-averaged)
CANDIDATES = 16  # nearest training images, coarse in pixels and in features each, compared exactly
PERCENTILE = 1.0  # "near": below this percentile of held-out images' L
NULL_PERMUTATIONS = 400
NULL_QUANTILE = 0.005  # the cell Z's threshold: this tail of its permutation null, less a margin
ALPHA = 0.001  # the near-duplicate rates' threshold: this tail of their exact null
MIN_CELL = 5  # cells with fewer samples on either side are left out of min_cell_z


def pixel_view(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, C, s, s) in [0, 1], s = min(H, VIEW) by area averaging."""
    x = images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return _pool(x, max(1, x.shape[-1] // VIEW))


def _pool(x: np.ndarray, factor: int) -> np.ndarray:
    if factor <= 1:
        return x
    n, c, h, w = x.shape
    return x.reshape(n, c, h // factor, factor, w // factor, factor).mean(axis=(3, 5))


def _nearest_k(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Indices (len(a), k) of the k nearest rows of b to each row of a (unordered)."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.argpartition(sq, k - 1, axis=1)[:, :k]


def shifted_nearest(
    points: np.ndarray, train: np.ndarray, point_features: np.ndarray, train_features: np.ndarray, chunk: int = 256
) -> np.ndarray:
    """Shift-tolerant distance (N,) of each view (N, C, s, s) to its nearest training view.

    Candidates: the CANDIDATES nearest training images in a view pooled by 2 x SHIFT (where a
    SHIFT px move is half a pixel) and the CANDIDATES nearest in the encoder's features (trained
    to ignore small shifts); then the exact RMS difference over the overlap, for every translation
    of up to SHIFT px, against each candidate; the smallest wins."""
    side = points.shape[-1]
    factor = 2 * SHIFT if side % (2 * SHIFT) == 0 and side >= 4 * SHIFT else 1
    coarse_train = _pool(train, factor).reshape(len(train), -1)
    k = min(CANDIDATES, len(train))
    out = np.empty(len(points), dtype=np.float64)
    for start in range(0, len(points), chunk):
        p = points[start : start + chunk]
        nearest = np.concatenate(
            [
                _nearest_k(_pool(p, factor).reshape(len(p), -1), coarse_train, k),
                _nearest_k(point_features[start : start + chunk], train_features, k),
            ],
            axis=1,
        )
        cand = train[nearest]  # (n, 2k, C, s, s)
        best = np.full(len(p), np.inf)
        for dy in range(-SHIFT, SHIFT + 1):
            for dx in range(-SHIFT, SHIFT + 1):
                a = p[:, None, :, max(dy, 0) : side + min(dy, 0), max(dx, 0) : side + min(dx, 0)]
                b = cand[:, :, :, max(-dy, 0) : side + min(-dy, 0), max(-dx, 0) : side + min(-dx, 0)]
                rms = np.sqrt(((a - b) ** 2).mean(axis=(2, 3, 4)))  # (n, k)
                best = np.minimum(best, rms.min(axis=1))
        out[start : start + len(p)] = best
    return out


def near_dup_threshold(n: int, m: int) -> float:
    """The largest share of n samples that may lie below the j-th smallest of m held-out distances
    (j = the PERCENTILE rank, at least 1) with probability above ALPHA, if samples and held-out
    images were exchangeable. K = the samples ranked before the j-th held-out image in a random
    order of all n + m: P(K = k) = C(k + j - 1, k) C(n - k + m - j, n - k) / C(n + m, n)."""
    from scipy.special import gammaln

    j = max(1, int(np.ceil(m * PERCENTILE / 100)))
    k = np.arange(n + 1)

    def log_comb(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return gammaln(a + 1) - gammaln(b + 1) - gammaln(a - b + 1)

    log_p = log_comb(k + j - 1, k) + log_comb(n - k + m - j, n - k) - log_comb(np.asarray(n + m), np.asarray(n))
    tail = np.cumsum(np.exp(log_p)[::-1])[::-1]  # P(K >= k)
    allowed = int(np.argmax(tail <= ALPHA)) - 1 if (tail <= ALPHA).any() else n
    return max(allowed, 0) / n


def _mann_whitney_z(x: np.ndarray, y: np.ndarray) -> float:
    """Z-score of the Mann-Whitney U statistic of x against y (normal approximation): ~N(0, 1)
    when both come from one distribution, negative when x is smaller."""
    from scipy.stats import rankdata

    m, n = len(x), len(y)
    ranks = rankdata(np.concatenate([x, y]))
    u = ranks[:m].sum() - m * (m + 1) / 2  # pairs (x_i, y_j) with x_i > y_j, ties counted half
    return float((u - m * n / 2) / np.sqrt(m * n * (m + n + 1) / 12))


@dataclass
class Distances:
    """L of one set of images: to the nearest training image in features and pixels, and the
    cell each image falls in."""

    feature: np.ndarray  # (N,)
    pixel: np.ndarray  # (N,)
    cell: np.ndarray  # (N,) int

    def take(self, index: np.ndarray) -> Distances:
        return Distances(self.feature[index], self.pixel[index], self.cell[index])


def statistics(samples: Distances, heldout: Distances, cells: int) -> dict[str, float]:
    """The three statistics of ``samples`` against ``heldout`` (see the module docstring)."""
    zs = []
    for c in range(cells):
        g, h = samples.feature[samples.cell == c], heldout.feature[heldout.cell == c]
        if len(g) >= MIN_CELL and len(h) >= MIN_CELL:
            zs.append(_mann_whitney_z(g, h))
    j = max(1, int(np.ceil(len(heldout.feature) * PERCENTILE / 100)))  # the j-th smallest: see near_dup_threshold
    q_feature = np.partition(heldout.feature, j - 1)[j - 1]
    q_pixel = np.partition(heldout.pixel, j - 1)[j - 1]
    median_h = float(np.median(heldout.feature))
    return {
        "near_dup_pixel": float((samples.pixel < q_pixel).mean()),
        "near_dup_feature": float((samples.feature < q_feature).mean()),
        "min_cell_z": float(min(zs)) if zs else float("nan"),
        "cells_used": float(len(zs)),
        "nn_ratio": float(np.median(samples.feature)) / median_h if median_h > 0 else float("nan"),
    }


@dataclass
class Detector:
    """What samples are checked against: the training set's views and features, the cells, and
    the held-out images' distances with the thresholds calibrated on them."""

    train_features: np.ndarray  # (M, D)
    train_pixels: np.ndarray  # (M, C, s, s)
    centres: np.ndarray  # (k, D)
    heldout: Distances
    thresholds: dict[str, float]

    def distances(self, features: np.ndarray, images: np.ndarray) -> Distances:
        """features (N, D), images uint8 (N, H, W, C) -> their Distances."""
        return Distances(
            nearest_distance(features, self.train_features),
            shifted_nearest(pixel_view(images), self.train_pixels, features, self.train_features),
            nearest_distance_index(features, self.centres),
        )

    def check(self, features: np.ndarray, images: np.ndarray) -> dict[str, object]:
        """The statistics of a sample set, its thresholds, and whether (and why) it is flagged."""
        stats = statistics(self.distances(features, images), self.heldout, len(self.centres))
        rate = near_dup_threshold(len(features), len(self.heldout.feature))
        thresholds = {**self.thresholds, "near_dup_pixel": rate, "near_dup_feature": rate}
        reasons = []
        for key in ("near_dup_pixel", "near_dup_feature"):
            if stats[key] > thresholds[key]:
                reasons.append(
                    f"{stats[key]:.0%} of samples are near-duplicates of training images in "
                    f"{key.split('_')[-1]}s (real images: at most {thresholds[key]:.0%})"
                )
        if np.isfinite(stats["min_cell_z"]) and stats["min_cell_z"] < thresholds["min_cell_z"]:
            reasons.append(
                f"in one region samples sit closer to training images than held-out images do "
                f"(cell Z {stats['min_cell_z']:.1f} < {thresholds['min_cell_z']:.1f})"
            )
        out: dict[str, object] = {f"copying_{k}": v for k, v in stats.items()}
        out.update({f"copying_{k}_threshold": v for k, v in thresholds.items()})
        out["copying_flagged"] = float(bool(reasons))
        out["copying_reasons"] = reasons
        return out


def build_detector(
    train_features: np.ndarray,
    train_images: np.ndarray,
    heldout_features: np.ndarray,
    heldout_images: np.ndarray,
    centres: np.ndarray,
    seed: int,
) -> Detector:
    """A Detector for these training and held-out images. The cell Z's threshold comes from a
    permutation null: NULL_PERMUTATIONS random halves A, B of the held-out images, A scored against
    B as samples are against all held-out images; the NULL_QUANTILE tail, less one unit so that a
    real set sits well inside it. The rates' thresholds are exact (near_dup_threshold) and set at
    check time, for the number of samples checked."""
    probe = Detector(train_features, pixel_view(train_images), centres, None, {})  # type: ignore[arg-type]
    heldout = probe.distances(heldout_features, heldout_images)
    rng = np.random.default_rng(seed)
    n = len(heldout.feature)
    null: dict[str, list[float]] = {"min_cell_z": []}
    for _ in range(NULL_PERMUTATIONS if n >= 4 else 0):
        order = rng.permutation(n)
        a, b = order[: n // 2], order[n // 2 :]
        stats = statistics(heldout.take(a), heldout.take(b), len(centres))
        for key in null:
            null[key].append(stats[key])
    thresholds = {}
    zs = np.asarray([z for z in null["min_cell_z"] if np.isfinite(z)])
    thresholds["min_cell_z"] = float(np.quantile(zs, NULL_QUANTILE) - 1.0) if len(zs) else -4.0
    return Detector(train_features, probe.train_pixels, centres, heldout, thresholds)

"""The GAN metrics against answers known in closed form or by construction."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from ganflow.metrics import class_metrics, feature_stats, frechet_distance, kid, precision_recall


def random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_fd_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).standard_normal((500, 8))
    assert frechet_distance(*feature_stats(x), *feature_stats(x)) == pytest.approx(0.0, abs=1e-8)


def test_fd_of_two_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    s1, s2 = random_spd(rng, 6), random_spd(rng, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    # diagonal covariances: sum (mu1 - mu2)^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    assert frechet_distance(np.zeros(3), np.diag(a), np.ones(3), np.diag(b)) == pytest.approx(3 + 1 + 1)


def test_fd_from_samples_converges_to_the_closed_form():
    rng = np.random.default_rng(2)
    x = rng.normal(0.0, 1.0, (20000, 3))
    y = rng.normal(1.0, 2.0, (20000, 3))  # mean shift 1, std 2: 3 * (1 + (2 - 1)^2) = 6
    assert frechet_distance(*feature_stats(x), *feature_stats(y)) == pytest.approx(6.0, rel=0.03)


def test_kid_is_zero_for_one_distribution_and_positive_for_a_shift():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((1000, 16)), rng.standard_normal((1000, 16))
    same, same_std = kid(x, y, subsets=20, subset_size=500, seed=0)
    assert abs(same) < 3 * same_std + 1e-3
    shifted, shifted_std = kid(x, y + 1.0, subsets=20, subset_size=500, seed=0)
    assert shifted > 0.1 and shifted > 10 * shifted_std and shifted > 20 * abs(same)


def test_precision_recall_identical_and_disjoint_sets():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((300, 4))
    assert precision_recall(x, x.copy(), k=3) == (1.0, 1.0)
    far = x + 100.0
    assert precision_recall(x, far, k=3) == (0.0, 0.0)
    # a generator covering only half the real data: precise, but recall ~ half
    half = x[x[:, 0] > 0]
    precision, recall = precision_recall(x, half, k=3)
    assert precision == 1.0 and 0.3 < recall < 0.75


def one_hot(classes, k):
    probs = np.full((len(classes), k), 0.01)
    probs[np.arange(len(classes)), classes] = 1.0
    return probs / probs.sum(1, keepdims=True)


def test_class_coverage_and_kl_on_hand_made_histograms():
    real = np.full(4, 0.25)
    balanced = class_metrics(one_hot(np.repeat(np.arange(4), 25), 4), real)
    assert balanced["classes_covered"] == 4
    assert balanced["class_kl"] == pytest.approx(0.0, abs=1e-12)
    assert balanced["class_max_rel_dev"] == pytest.approx(0.0)
    collapsed = class_metrics(one_hot(np.zeros(100, int), 4), real)
    assert collapsed["classes_covered"] == 1
    assert collapsed["class_kl"] == pytest.approx(np.log(4))  # KL(delta || uniform over 4)
    skewed = class_metrics(one_hot(np.array([0] * 50 + [1] * 50), 4), real)
    assert skewed["classes_covered"] == 2
    assert skewed["class_kl"] == pytest.approx(np.log(2))
    assert skewed["class_max_rel_dev"] == pytest.approx(1.0)  # 0.5 vs 0.25, and 0 vs 0.25
    # the Inception-Score analogue: ~number of classes when confident and balanced, ~1 when collapsed
    assert balanced["is_domain"] > 3.0 and collapsed["is_domain"] == pytest.approx(1.0, abs=1e-6)

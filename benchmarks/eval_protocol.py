"""Can the evaluation be flattered? The protocol's own checks, on the project's data, in one run.

    .venv/bin/python benchmarks/eval_protocol.py [--params params.yaml] [--smoke]

Needs the project's prepared data and encoder (`dvc repro encoder`); the generator rows need the
exported generator (`dvc repro train`) and are skipped, and say so, without one. Prints, each as
mean ± sd over eval.draws draws (float32; the evaluation never autocasts):

  real vs real      two disjoint halves of the train split, one as "samples", the other as the
                    real baseline: fd_domain_over_real should be 1 within 2 sd
  verbatim copies   train images as samples: ~1x the real baseline by construction, and flagged
  30 % copies       the generator with 30 % of each draw replaced by train images: flagged
  noisy copies      train images + N(0, 4/255) noise: flagged
  shifted copies    train images moved by 1 px and 2 px (edges replicated): flagged
  held-out real     test images checked against a detector calibrated on validation only: not flagged
  shifted held-out  test images moved by 1 and 2 px, scored against validation at the reference's
                    own size (k = 1): fd_domain_over_real within 1.2 of the unshifted test images'
  generator         the exported generator as the evaluate stage scores it, next to a judge that
                    shares nothing with the encoder: Fréchet distance of 8x8 area-averaged pixels,
                    generated vs test over real-train vs test, drawn the same way
  cost              the evaluation's wall time against the training's MLflow run (start to end)

--smoke: 16 px digits in a scratch folder, a 1-epoch encoder, an untrained generator, 2 draws
(checks the script runs, not the figures).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _scratch import smoke_data

from ganflow.config import load_config
from ganflow.copying import build_detector
from ganflow.dataset import PreparedDataset
from ganflow.encoder import encode
from ganflow.evaluation import (
    Reference,
    Split,
    codes_for,
    draw_counts,
    evaluate_generator,
    images_of,
    load_reference,
    score,
    test_split,
)
from ganflow.evaluation import detector as copy_detector
from ganflow.images import to_uint8
from ganflow.metrics import fd
from ganflow.models import build_generator
from ganflow.sampling import generator_meta, load_generator_dir


def features_of(reference: Reference, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return encode(reference.encoder, x)


def shift(images: np.ndarray, px: int) -> np.ndarray:
    """uint8 (N, H, W, C) moved right and down by px, the edges replicated."""
    padded = np.pad(images, ((0, 0), (px, 0), (px, 0), (0, 0)), mode="edge")
    return padded[:, : images.shape[1], : images.shape[2]]


def stratified_draws(
    labels: np.ndarray, counts: np.ndarray, draws: int, rng: np.random.Generator, labelled: bool, replace: bool = False
) -> list[np.ndarray]:
    """``draws`` index sets into ``labels`` with the given class counts (without replacement in a
    draw unless a class has too few; ``replace``: as the real baseline does then)."""
    out = []
    for _ in range(draws):
        if labelled:
            members = [np.flatnonzero(labels == c) for c in range(len(counts))]
            out.append(
                np.concatenate(
                    [
                        rng.choice(members[c], int(n), replace=replace and int(n) > len(members[c]))
                        for c, n in enumerate(counts)
                        if n > 0
                    ]
                )
            )
        else:
            out.append(rng.choice(len(labels), int(counts[0]), replace=replace and int(counts[0]) > len(labels)))
    return out


def row(name: str, m: dict, expect: str) -> None:
    ratio = m.get("fd_domain_over_real", float("nan"))
    print(
        f"{name:18s} fd_domain {m['fd_domain']:7.3f} ± {m['fd_domain_sd']:.3f}  real {m['real_fd_domain']:7.3f} ± "
        f"{m['real_fd_domain_sd']:.3f}  ratio {ratio:5.2f} ± {m.get('fd_domain_over_real_sd', float('nan')):.2f}  "
        f"KID {m['kid']:+.4f} (real {m['real_kid']:+.4f})  flagged {m.get('copying_flagged', float('nan')):.0f}  "
        f"[expected: {expect}]",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    cfg = load_config(args.params)
    tmp = tempfile.TemporaryDirectory()
    if args.smoke:
        smoke_data(cfg, Path(tmp.name))
        cfg.eval.draws = 2
    reference = load_reference(cfg)
    rng = np.random.default_rng(cfg.eval.seed)
    train = PreparedDataset(cfg.paths.prepared, part="train")
    val = PreparedDataset(cfg.paths.prepared, part="validation")
    test, test_images = test_split(reference)
    detector = copy_detector(reference, test, test_images, *images_of(reference))  # the evaluate stage's own
    train_images = train.images.read_many(train.indices[reference.train_index])
    train_feats = reference.train_features
    labelled = reference.labelled
    print(
        f"{cfg.data.image_size}px {cfg.data.source}: train {len(train)}, validation {len(val)}, test "
        f"{len(test.features)}; draws of {test.draw_size} against test; eval.draws {cfg.eval.draws}; float32"
    )

    def scored(ref: Reference, images: np.ndarray, index: list[np.ndarray], check: bool = True) -> dict:
        feats, probs = features_of(ref, images)
        m = score(ref, [(feats[i], None if probs is None else probs[i]) for i in index], cfg.eval.seed + 7)
        if check:
            m.update(detector.check(feats[index[0]], images[index[0]]))
        return m

    # real vs real: halves A (baseline) and B (samples) of the train split, disjoint, stratified
    pool = np.arange(len(reference.train_labels))
    order = rng.permutation(pool)
    half_a = np.sort(
        np.concatenate(
            [order[reference.train_labels[order] == c][::2] for c in np.unique(reference.train_labels[pool])]
        )
    )
    half_b = np.setdiff1d(pool, half_a)
    classes = len(reference.class_names)
    split_ab = Split(
        "test",
        test.features,
        test.labels,
        draw_counts(reference.train_labels[half_a], test.labels, classes, cfg.eval.num_samples),
    )
    ref_a = Reference(
        reference.encoder,
        reference.spec,
        split_ab,
        reference.train_features[half_a],
        reference.train_labels[half_a],
        reference.train_index[half_a],
        reference.cells,
        reference.class_freq,
        reference.class_names,
        cfg,
    )
    index_b = stratified_draws(
        reference.train_labels[half_b], split_ab.draw_counts, cfg.eval.draws, rng, labelled, replace=True
    )
    m = score(ref_a, [(train_feats[half_b][i], None) for i in index_b], cfg.eval.seed + 7)
    row("real vs real", m, "ratio 1 within 2 sd")

    ref_test = reference.with_split(test)
    index = stratified_draws(reference.train_labels, test.draw_counts, cfg.eval.draws, rng, labelled)
    row("verbatim copies", scored(ref_test, train_images, index), "ratio ~1, flagged")
    noisy = np.clip(train_images + rng.normal(0, 4, train_images.shape), 0, 255).astype(np.uint8)
    row("noisy copies", scored(ref_test, noisy, index), "flagged")
    for px in (1, 2):
        row(f"shifted {px} px copy", scored(ref_test, shift(train_images, px), index), "flagged")

    held_detector = build_detector(
        reference.train_features,
        train_images,
        reference.split.features,
        val.images.read_many(val.indices),
        reference.cells,
        cfg.eval.seed,
    )
    feats, _ = features_of(reference, test_images)
    verdict = held_detector.check(feats, test_images)
    print(
        f"{'held-out real':18s} test images against a validation-calibrated detector: flagged "
        f"{verdict['copying_flagged']:.0f} (near-dup pixel {verdict['copying_near_dup_pixel']:.3f} / "
        f"{verdict['copying_near_dup_pixel_threshold']:.3f}, feature {verdict['copying_near_dup_feature']:.3f} / "
        f"{verdict['copying_near_dup_feature_threshold']:.3f}, min cell Z {verdict['copying_min_cell_z']:.2f} / "
        f"{verdict['copying_min_cell_z_threshold']:.2f}) [expected: not flagged]"
    )

    # shifted held-out: test images (k = 1: the validation split's own counts) against validation
    k1 = Split(
        "validation",
        reference.split.features,
        reference.split.labels,
        np.bincount(reference.split.labels, minlength=classes)
        if labelled
        else np.asarray([len(reference.split.labels)]),
    )
    ref_k1 = reference.with_split(k1)
    test_index = stratified_draws(test.labels, k1.draw_counts, 1, rng, labelled)
    base = scored(ref_k1, test_images, test_index * cfg.eval.draws, check=False)
    row("test as samples", base, "ratio ~1")
    for px in (1, 2):
        m = scored(ref_k1, shift(test_images, px), test_index * cfg.eval.draws, check=False)
        row(f"test shifted {px} px", m, f"ratio within 1.2x of {base['fd_domain_over_real']:.2f}")

    # the generator: the exported one, or (smoke) an untrained one
    if args.smoke:
        meta = {"latent_dim": cfg.model.latent_dim, "class_prior": list(reference.class_freq) or None}
        g = build_generator(cfg, classes).eval()
    elif (cfg.paths.generator / "generator.json").is_file():
        meta, g = generator_meta(cfg.paths.generator), load_generator_dir(cfg.paths.generator)
    else:
        print(f"no generator at {cfg.paths.generator}: the generator rows need `dvc repro train`")
        return 0

    def sample(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return g(z)

    started = time.perf_counter()
    metrics, _ = evaluate_generator(cfg, sample, meta, reference)
    eval_s = time.perf_counter() - started
    row("generator (test)", metrics, "not flagged")
    v = metrics["validation"]
    print(
        f"{'generator (val)':18s} fd_domain {v['fd_domain']:.3f} ± {v['fd_domain_sd']:.3f}, ratio "
        f"{v['fd_domain_over_real']:.2f} ± {v['fd_domain_over_real_sd']:.2f}"
    )
    for px in (1, 2):
        part = 0.3
        codes = codes_for(test, meta["latent_dim"], bool(meta["class_prior"]), torch.Generator().manual_seed(5))
        fake = to_uint8(sample(codes))
        draws = []
        for i in index:
            mixed = fake.copy()
            pick = rng.random(len(mixed)) < part
            mixed[pick] = train_images[i][pick] if px == 1 else shift(train_images[i], 1)[pick]
            draws.append(mixed)
        stacked = np.concatenate(draws)
        spans = [np.arange(j * len(fake), (j + 1) * len(fake)) for j in range(len(draws))]
        label = "30 % copies" if px == 1 else "30 % shifted copy"
        row(label, scored(ref_test, stacked, spans), "flagged")

    # the judge: 8x8 area-averaged pixels, generated vs test over real-train vs test, drawn the same way
    def pixels(images: np.ndarray) -> np.ndarray:
        f = images.shape[1] // 8
        x = images.astype(np.float64).reshape(len(images), 8, f, 8, f, -1).mean(axis=(2, 4))
        return x.reshape(len(images), -1) / 255.0

    test_px = pixels(test_images)
    g_fd, r_fd = [], []
    for i, idx in enumerate(index):
        codes = codes_for(
            test, meta["latent_dim"], bool(meta["class_prior"]), torch.Generator().manual_seed(cfg.eval.seed + 1 + i)
        )
        g_fd.append(fd(pixels(to_uint8(sample(codes))), test_px))
        r_fd.append(fd(pixels(train_images[idx]), test_px))
    ratio = np.mean(g_fd) / np.mean(r_fd)
    rel = np.hypot(np.std(g_fd, ddof=1) / np.mean(g_fd), np.std(r_fd, ddof=1) / np.mean(r_fd))
    print(
        f"{'pixel judge':18s} 8x8-pixel FD {np.mean(g_fd):.4f} ± {np.std(g_fd, ddof=1):.4f}, real "
        f"{np.mean(r_fd):.4f} ± {np.std(r_fd, ddof=1):.4f}: ratio {ratio:.2f} ± {ratio * rel:.2f} "
        f"(encoder: {metrics['fd_domain_over_real']:.2f} ± {metrics['fd_domain_over_real_sd']:.2f})"
    )

    run_id = (
        json.loads((cfg.paths.generator / "generator.json").read_text()).get("mlflow_run_id")
        if not args.smoke
        else None
    )
    train_s = 0.0
    if run_id:
        from mlflow.tracking import MlflowClient

        from ganflow.tracking import tracking_uri

        info = MlflowClient(tracking_uri(cfg)).get_run(run_id).info
        train_s = ((info.end_time or 0) - info.start_time) / 1000 if info.start_time else 0.0
    if train_s > 0:
        print(
            f"{'cost':18s} evaluation {eval_s:.1f} s = {eval_s / train_s:.1%} of the training's {train_s:.0f} s "
            "(its MLflow run, start to end)"
        )
    else:
        print(f"{'cost':18s} evaluation {eval_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

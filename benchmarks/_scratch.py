"""Helpers the benchmark scripts share (not a benchmark itself): scratch stores, the --smoke data
set, scoring an exported generator as the evaluate stage does."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from ganflow.data import prepare
from ganflow.encoder import fit_encoder
from ganflow.evaluation import evaluate_generator
from ganflow.sampling import generator_meta, load_generator_dir


def scratch(cfg, workdir: Path):
    """A copy of ``cfg`` whose outputs and MLflow store live in ``workdir``; data and encoder stay."""
    out = cfg.model_copy(deep=True)
    for name in ("ray_results", "mlflow_db", "mlflow_artifacts", "tune_best", "generator", "metrics", "plots"):
        setattr(out.paths, name, workdir / name)
    out.tracking.uri = None
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return out


def smoke_data(cfg, workdir: Path) -> None:
    """--smoke: 16 px digits, narrow networks, a 1-epoch encoder, prepared into ``workdir``."""
    cfg.model.g_width = cfg.model.d_width = 8
    cfg.data.image_size, cfg.data.source = 16, "digits"
    cfg.eval.encoder_epochs, cfg.eval.num_samples, cfg.eval.kid_subset_size = 1, 200, 100
    cfg.paths.prepared, cfg.paths.encoder = workdir / "prepared", workdir / "encoder"
    prepare(cfg)
    fit_encoder(cfg)


def score_exported(cfg) -> dict:
    """Every metric of the generator exported to cfg.paths.generator, as the evaluate stage scores it."""
    g = load_generator_dir(cfg.paths.generator)

    def sample(z):
        with torch.no_grad():
            return g(z)

    return evaluate_generator(cfg, sample, generator_meta(cfg.paths.generator))[0]


# --dataset of quality.py (and the other benchmarks that take one): real images this machine has
# without a download. Each but "digits" is written as a .npz and prepared, with an encoder of its
# own, into the benchmark's scratch folder.
DATASETS = {
    "digits": "the project's prepared digits and encoder (params.yaml's data:; `dvc repro encoder`)",
    "digits-100": "100 images of the digit 3 from scikit-learn's digits, unlabelled: a 100-image set, "
    "trained unconditionally",
    "digits-300": "300 of scikit-learn's digits, 30 per class, labelled",
    "faces-100": "100 face photographs, 25 px grayscale, aligned: the faces of the LFW subset that ships "
    "with scikit-image (skimage/data/lfw_subset.npy; `pip install scikit-image`), resized to 32 px, "
    "unlabelled",
    "faces-100-64": "the faces of faces-100 resized to 64 px (soft: the source is 25 px), grayscale: "
    "a 64 px set with a subject one can judge by eye",
    "photo-crops-64": "300 RGB crops at 64 px, unlabelled, of the three photographs that ship with the "
    "installed packages (scikit-learn's china.jpg and flower.jpg, matplotlib's "
    "grace_hopper.jpg): random squares of 96-224 px side, resized",
}


FACES = ("faces-100", "faces-100-64")  # read from scikit-image's wheel, not a project dependency


def dataset_unavailable(name: str) -> str | None:
    """Why DATASETS[name] cannot be built here (a package it reads is not installed), or None.
    A script over several sets checks them all first, so it does not fail at the last one after
    training on the others."""
    if name in FACES:
        spec = importlib.util.find_spec("skimage")
        if spec is None or spec.origin is None:
            return f"{name} reads scikit-image's bundled LFW subset: pip install scikit-image"
    return None


def dataset_arrays(name: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(images uint8 NHWC, labels or None, image_size) of a DATASETS entry (not "digits")."""
    rng = np.random.default_rng(seed)
    if name.startswith("digits-"):
        from sklearn.datasets import load_digits

        digits = load_digits()
        gray = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        if name == "digits-100":
            index = rng.choice(np.flatnonzero(digits.target == 3), 100, replace=False)
            return gray[np.sort(index)], None, 32
        index = np.concatenate([rng.choice(np.flatnonzero(digits.target == c), 30, replace=False) for c in range(10)])
        return gray[np.sort(index)], digits.target[np.sort(index)].astype(np.int64), 32
    if name in FACES:
        from PIL import Image

        if why := dataset_unavailable(name):
            raise SystemExit(f"error: {why}")
        spec = importlib.util.find_spec("skimage")
        faces = np.load(Path(spec.origin).parent / "data" / "lfw_subset.npy")[:100]  # the rest are non-faces
        size = 64 if name.endswith("-64") else 32
        gray = [
            Image.fromarray(np.rint(face * 255).astype(np.uint8)).resize((size, size), Image.Resampling.LANCZOS)
            for face in faces
        ]
        return np.stack([np.asarray(g) for g in gray])[..., None], None, size
    if name == "photo-crops-64":
        import matplotlib
        from PIL import Image
        from sklearn.datasets import load_sample_images

        photos = list(load_sample_images().images)
        hopper = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"
        photos.append(np.asarray(Image.open(hopper).convert("RGB")))
        crops = []
        for i in range(300):
            photo = photos[i % len(photos)]
            side = int(rng.integers(96, 225))
            top, left = (int(rng.integers(0, photo.shape[k] - side + 1)) for k in (0, 1))
            square = Image.fromarray(photo[top : top + side, left : left + side])
            crops.append(np.asarray(square.resize((64, 64), Image.Resampling.LANCZOS)))
        return np.stack(crops), None, 64
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def dataset_cfg(cfg, name: str, workdir: Path):
    """A copy of ``cfg`` on DATASETS[name], prepared (and its encoder fitted) in ``workdir``;
    "digits" is ``cfg`` itself. model.conditional stays as the params say: auto trains the
    labelled sets conditionally and the others not."""
    if name == "digits":
        return cfg
    images, labels, size = dataset_arrays(name)
    workdir.mkdir(parents=True, exist_ok=True)
    arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
    np.savez(workdir / f"{name}.npz", **arrays)
    out = cfg.model_copy(deep=True)
    out.data.source, out.data.path = "npz", workdir / f"{name}.npz"
    out.data.image_size, out.data.channels = size, images.shape[-1]
    out.paths.prepared, out.paths.encoder = workdir / "prepared", workdir / "encoder"
    prepare(out)
    fit_encoder(out)
    return out

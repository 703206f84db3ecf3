"""Helpers the benchmark scripts share (not a benchmark itself): scratch stores, the --smoke data
set, scoring an exported generator as the evaluate stage does."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ganflow.data import prepare
from ganflow.encoder import fit_encoder
from ganflow.evaluation import evaluate_generator
from ganflow.sampling import generator_meta, load_generator_dir


def scratch(cfg, workdir: Path):
    """A copy of ``cfg`` whose outputs and MLflow store live in ``workdir``; data and encoder stay."""
    out = cfg.model_copy(deep=True)
    out._root = cfg.root
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

"""A finished training's checkpoint -> the exported EMA generator, its metrics and plots, and
the MLflow model."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ganflow.artifacts import CHECKPOINT_STATE
from ganflow.atomic import write_file
from ganflow.checkpoint_io import load_state_file, read_checkpoint_meta
from ganflow.config import Config
from ganflow.models import build_generator, recompute_batchnorm
from ganflow.sampling import export_generator
from ganflow.train_loop import TIMINGS


@dataclass
class TrainSummary:
    run_id: str
    epochs: int
    final: dict[str, float]
    history: list[dict[str, float]]
    lr_g: float
    lr_d: float
    resumed_from_epoch: int
    best_epoch: int
    best_fd: float | None
    restarts: list[str] = field(default_factory=list)  # causes of the worker restarts of this stage run


def export(
    cfg: Config,
    checkpoint: Path,
    run_id: str,
    lr_g: float,
    lr_d: float,
    resumed_from: int,
    restarts: list[str] | None = None,
) -> TrainSummary:
    """Checkpoint -> paths.generator (EMA generator), metrics/train.json, plots/train.csv."""
    meta = read_checkpoint_meta(checkpoint)
    tensors = load_state_file(checkpoint / CHECKPOINT_STATE)
    spec = {
        "latent_dim": cfg.model.latent_dim,
        "channels": cfg.data.channels,
        "image_size": cfg.data.image_size,
        "g_width": cfg.net_widths[0],
        "arch": cfg.model.arch,
        # a conditional G's input is z followed by a one-hot class: its classes and their frequencies
        "num_classes": len(meta.get("class_prior") or []),
        "class_names": meta.get("class_names"),
        "class_prior": meta.get("class_prior"),
        "epoch": meta["epoch"],
        "mlflow_run_id": run_id,
        "lr_g": lr_g,
        "lr_d": lr_d,
        "config": meta["config"],
    }
    # the best EMA generator by in-training fd_domain; the last one if no evaluation ran
    best = "best_ema_g" in tensors
    spec.update(best_epoch=meta["best_epoch"] if best else meta["epoch"], fd_domain=meta["best_fd"])
    g = build_generator(cfg, spec["num_classes"])
    g.load_state_dict(tensors["best_ema_g" if best else "ema_g"])
    recompute_batchnorm(
        g, seed=cfg.train.seed, prior=spec["class_prior"]
    )  # statistics of the exported weights, not of the live G
    export_generator(g.state_dict(), spec, cfg.paths.generator)
    history = meta["history"]
    final = {k: v for k, v in history[-1].items() if k != "epoch"}
    deterministic = {k: v for k, v in final.items() if k not in TIMINGS}
    best_row = next((r for r in history if r.get("epoch") == spec["best_epoch"]), history[-1])
    summary = {
        "epochs": meta["epoch"],
        "kimg": final.get("kimg"),
        "lr_g": lr_g,
        "lr_d": lr_d,
        "best_epoch": spec["best_epoch"],
        "best_kimg": best_row.get("kimg"),
        "best_fd_domain": meta["best_fd"],
        "last": deterministic,
        # worker-group failures Ray restarted from a checkpoint in this stage run, with their causes
        "worker_restarts": len(restarts or []),
        "worker_restart_causes": list(restarts or []),
    }
    write_file(cfg.paths.metrics / "train.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    buf = io.StringIO()
    columns = ["epoch", "kimg", "loss_d", "loss_g", "d_real", "d_fake", "rt", "augment_p", "fd_domain", "kid"]
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_file(cfg.paths.plots / "train.csv", buf.getvalue())
    return TrainSummary(
        run_id,
        meta["epoch"],
        final,
        history,
        lr_g,
        lr_d,
        resumed_from,
        spec["best_epoch"],
        meta["best_fd"],
        list(restarts or []),
    )


def log_model(cfg: Config, run_id: str) -> None:
    """The EMA generator as an MLflow model: one float32 input (N, latent_dim [+ num_classes]),
    z followed for a conditional G by a one-hot class, -> images (N, C, H, W) in [-1, 1]. The
    model's metadata says how the input splits (latent_dim, num_classes) and names the classes."""
    import mlflow
    import mlflow.pytorch
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from ganflow.models import draw_codes
    from ganflow.sampling import generator_meta, load_generator_dir

    g = load_generator_dir(cfg.paths.generator)
    meta = generator_meta(cfg.paths.generator)
    # a batch of 2 in the example keeps the exported batch dimension dynamic
    code = draw_codes(2, g.latent_dim, meta["class_prior"], torch.Generator().manual_seed(0)).numpy()
    with torch.no_grad():
        out = g(torch.from_numpy(code)).numpy()
    # unnamed: MLflow's PyTorch flavour hands a named input to the model as a dict, which it refuses
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, g.code_dim))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *out.shape[1:]))]),
    )
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        mlflow.pytorch.log_model(
            g,
            name="generator",
            signature=signature,
            input_example=code,
            metadata=meta,
            pip_requirements=[f"torch>={torch.__version__.split('+')[0]}", "numpy"],
        )
        mlflow.log_artifacts(str(cfg.paths.generator), artifact_path="generator_files")

"""Training throughput: the default train stage against a bare PyTorch loop on every core.

    .venv/bin/python benchmarks/train_throughput.py [--epochs 6] [--smoke]

The model, data and update are the project's defaults (params.yaml: the digits at 32 px, the
conditional DCGAN with its mode-seeking term, batch 64, train.amp as it resolves on this machine).
Prints, from one run on one machine:
  - images/s of a bare loop: the same update (ganflow.gan_step.gan_step) in one plain process
    with one thread per core, no Ray, no MLflow, no evaluation, no checkpoints; measured before
    and after the stage, and the faster counts (a noisy machine can only make the stage look
    worse). The same loop in full precision (train.amp: off) shows what mixed precision buys;
  - images/s of the train stage's driver (pipelines/train.py's run_training: a local Ray, one
    worker with every core, MLflow, per-epoch evaluation, sample grids, checkpoints), steady state
    (the median epoch after the first): of its steps alone, and of its whole epochs (steps,
    evaluation, sample grid, logging: the `epoch_s` each epoch reports);
  - the ratios stage / bare (issue goal: >= 0.9 for whole epochs);
  - the stage's fixed cost: its wall time minus its epochs (Ray start-up, export, model logging).
Everything runs in a scratch folder (the digits prepared and an encoder fitted there: the train
stage refuses to run without one). --smoke: 2 epochs of 16 px, narrow networks, a 1-epoch encoder
(checks the script runs, not the figures).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from ganflow.artifacts import class_prior
from ganflow.config import load_config
from ganflow.data import prepare
from ganflow.dataset import PreparedDataset
from ganflow.encoder import fit_encoder
from ganflow.gan_step import amp_dtype, build_state, gan_step, noise_seed
from ganflow.train_loop import local_batches

REPO = Path(__file__).resolve().parents[1]


def write_params(root: Path, args: argparse.Namespace, amp: str = "auto") -> Path:
    """The project's params.yaml with the paths in ``root``; tune off (the rates are given)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["paths"] = {key: str(root / key) for key in params["paths"]}
    params["train"].update(epochs=args.epochs, tick_kimg=0.001, amp=amp)  # every epoch a tick: an epoch_s each
    params["tune"]["enabled"] = False
    if args.smoke:
        params["data"]["image_size"] = 16
        params["model"].update(g_width=8, d_width=8, latent_dim=16)
        params["eval"].update(encoder_epochs=1, num_samples=100, kid_subset_size=50, feature_dim=16)
    path = root / f"params-{amp}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def bare_run(params: Path, threads: int) -> float:
    """Images/s of the default update in a plain loop: median of the epochs after the first."""
    cfg = load_config(params)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    classes = class_prior(cfg)
    state = build_state(cfg, device, cfg.train.lr_g, cfg.train.lr_d, classes[1] if classes else None)
    batches = local_batches(cfg, 0, 1, cfg.train.batch_size, device)
    z_gen = torch.Generator()
    rates = []
    for epoch in range(cfg.train.epochs):
        z_gen.manual_seed(noise_seed(cfg.train.seed, 0, epoch))
        started, images = time.perf_counter(), 0
        for i, (real, labels) in enumerate(batches(epoch)):
            diag = gan_step(state, cfg, real, z_gen, update_g=(i + 1) % cfg.train.d_steps == 0, labels=labels)
            {k: float(v) for k, v in diag.items()}  # the stage reads its diagnostics every step too
            images += real.shape[0]
        rates.append(images / (time.perf_counter() - started))
    torch.set_num_threads(previous)
    return statistics.median(rates[1:] or rates)


def stage_run(params: Path) -> dict[str, float]:
    from ganflow.training import run_training

    cfg = load_config(params)
    started = time.perf_counter()
    summary = run_training(cfg, cfg.train.lr_g, cfg.train.lr_d)
    wall = time.perf_counter() - started
    images = len(PreparedDataset(cfg.paths.prepared, part="train")) // cfg.train.batch_size * cfg.train.batch_size
    steady = summary.history[1:] or summary.history
    return {
        "steps": statistics.median(row["imgs_per_sec"] for row in steady),
        "epochs": images / statistics.median(row["epoch_s"] for row in steady),
        "fixed": wall - sum(row["epoch_s"] for row in summary.history),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--smoke", action="store_true", help="tiny: checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.epochs = 2
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cores = os.cpu_count() or 1

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params, fp32 = write_params(root, args), write_params(root, args, amp="off")
        cfg = load_config(params)
        prepare(cfg)
        fit_encoder(cfg)
        dtype = amp_dtype(cfg, torch.device("cpu"))
        bare_before = bare_run(params, cores)
        stage = stage_run(params)
        bare_after = bare_run(params, cores)
        bare_fp32 = bare_run(fp32, cores)
        bare = max(bare_before, bare_after)

    precision = str(dtype).replace("torch.", "") if dtype else "float32"
    print(
        f"machine: {cores} CPUs, torch {torch.__version__}; the default recipe, {cfg.data.image_size} px, "
        f"batch {cfg.train.batch_size}, {args.epochs} epochs, {precision} (train.amp: {cfg.train.amp})"
    )
    print(
        f"bare loop, 1 process, {cores} threads        {bare:9.1f} img/s   "
        f"(best of {bare_before:.1f} before and {bare_after:.1f} after)"
    )
    print(
        f"bare loop, {cores} threads, float32 (amp off) {bare_fp32:9.1f} img/s   "
        f"x{bare / bare_fp32:.2f} for {precision}"
    )
    print(f"train stage, steps only                {stage['steps']:9.1f} img/s   x{stage['steps'] / bare:.3f} bare")
    print(
        f"train stage, whole epochs              {stage['epochs']:9.1f} img/s   x{stage['epochs'] / bare:.3f} bare"
        f"   (goal >= 0.9)"
    )
    print(f"train stage, fixed cost (start-up, export) {stage['fixed']:6.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

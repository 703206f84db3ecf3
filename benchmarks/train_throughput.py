"""Training throughput: the ganflow loop in Ray workers against a bare PyTorch loop.

    .venv/bin/python benchmarks/train_throughput.py [--epochs 3] [--image-size 32] [--width 64] [--smoke]

Prints, from one run on one machine:
  - images/s of the ganflow loop in one Ray worker (the real train stage: MLflow logging,
    EMA, checkpoints), steady state (epochs after the first);
  - images/s of a bare single-process PyTorch loop (same model, batch, data, optimizers, EMA,
    same thread count), and the ratio ganflow / bare (goal >= 0.95);
  - the same bare loop with one thread per core: the machine's limit for this model;
  - the fixed start-up cost of a TorchTrainer.fit() (wall time minus the epochs' time);
  - images/s with 2 workers against 1 on this machine.
Everything runs in a scratch folder: the digits are prepared and an encoder fitted there (the train
stage refuses to run without one); in-training evaluation is off. --smoke: 1 epoch of 16 px,
narrow networks, no 2-worker row (checks the script runs, not the figures).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from ganflow.config import load_config
from ganflow.data import PreparedDataset, prepare
from ganflow.evaluation import fit_encoder
from ganflow.losses import LOSSES
from ganflow.models import build_discriminator, build_generator
from ganflow.train_loop import ema_decay_at, update_ema


def write_params(root: Path, args: argparse.Namespace, workers: int) -> Path:
    params = root / f"params-{workers}.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "paths": {"prepared": str(root / "prepared"), "encoder": str(root / "encoder"),
                          "generator": str(root / f"gen-{workers}"),
                          "metrics": str(root / f"metrics-{workers}"), "plots": str(root / f"plots-{workers}"),
                          "mlflow_db": str(root / "mlflow.db"), "ray_results": str(root / "ray_results")},
                "data": {"image_size": args.image_size},
                "model": {"g_width": args.width, "d_width": args.width},
                "train": {"epochs": args.epochs, "batch_size": args.batch_size, "seed": workers},
                "eval": {"every": 1000, "encoder_epochs": 1, "num_samples": 200, "kid_subset_size": 100},
                "cluster": {"num_workers": workers, "cpus_per_worker": 1},
            }
        )
    )
    return params


def ganflow_run(params: Path) -> dict[str, float]:
    from ganflow.distributed import run_training

    cfg = load_config(params)
    started = time.perf_counter()
    summary = run_training(cfg, cfg.train.lr_g, cfg.train.lr_d)
    wall = time.perf_counter() - started
    images = len(PreparedDataset(cfg.paths.prepared, part="train")) // cfg.train.batch_size * cfg.train.batch_size
    epoch_times = [images / row["imgs_per_sec"] for row in summary.history]
    steady = [row["imgs_per_sec"] for row in summary.history[1:]] or [summary.history[0]["imgs_per_sec"]]
    return {"imgs_per_sec": statistics.median(steady), "wall": wall, "epochs_time": sum(epoch_times)}


def bare_run(params: Path, threads: int = 1) -> float:
    """The same GAN update in plain PyTorch, one process, ``threads`` threads (1: as one ganflow worker)."""
    cfg = load_config(params)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    g, d = build_generator(cfg), build_discriminator(cfg)
    ema = copy.deepcopy(g).eval().requires_grad_(False)
    betas = (cfg.train.beta1, cfg.train.beta2)
    opt_g = torch.optim.Adam(g.parameters(), lr=cfg.train.lr_g, betas=betas)
    opt_d = torch.optim.Adam(d.parameters(), lr=cfg.train.lr_d, betas=betas)
    d_loss_fn, g_loss_fn = LOSSES["bce"]
    loader = torch.utils.data.DataLoader(
        PreparedDataset(cfg.paths.prepared, part="train"), batch_size=cfg.train.batch_size, shuffle=True,
        drop_last=True,
    )
    rates, g_steps = [], 0
    for _ in range(cfg.train.epochs):
        started, images = time.perf_counter(), 0
        for real, _ in loader:
            z = torch.randn(real.shape[0], cfg.model.latent_dim)
            fake = g(z)
            loss_d = d_loss_fn(d(real), d(fake.detach()))
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            loss_g = g_loss_fn(d(fake))
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            update_ema(ema, g, ema_decay_at(cfg.train.ema_decay, g_steps))
            g_steps += 1
            float(loss_d.detach()), float(loss_g.detach())  # the ganflow loop reads its diagnostics every step too
            images += real.shape[0]
        rates.append(images / (time.perf_counter() - started))
    torch.set_num_threads(previous)
    return statistics.median(rates[1:] or rates)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--smoke", action="store_true", help="tiny: checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.epochs, args.image_size, args.width = 1, 16, 8
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cores = os.cpu_count() or 1

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        one, two = write_params(root, args, 1), write_params(root, args, 2)
        prepare(load_config(one))
        fit_encoder(load_config(one))
        # the baseline runs before and after, and the faster counts: a noisy machine can only
        # make the ratio look worse, not better
        bare_before = bare_run(one)
        first = ganflow_run(one)
        second = None if args.smoke else ganflow_run(two)
        bare_after = bare_run(one)
        bare_all = bare_run(one, threads=cores)
        bare = max(bare_before, bare_after)

    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.image_size}px, widths {args.width}, batch {args.batch_size}, {args.epochs} epochs")
    print(f"bare PyTorch loop, 1 process, 1 thread  {bare:9.1f} img/s   "
          f"(best of {bare_before:.1f} before and {bare_after:.1f} after)")
    print(f"ganflow loop, 1 Ray worker (1 CPU)      {first['imgs_per_sec']:9.1f} img/s")
    print(f"ratio ganflow / bare                    {first['imgs_per_sec'] / bare:9.3f}   (goal >= 0.95)")
    print(f"bare PyTorch loop, 1 process, {cores} threads {bare_all:9.1f} img/s   (this machine's limit)")
    print(f"fit() start-up + export, 1 worker       {first['wall'] - first['epochs_time']:9.1f} s")
    if second is not None:
        print(f"ganflow loop, 2 Ray workers (1 CPU each){second['imgs_per_sec']:9.1f} img/s")
        print(f"speed-up 2 workers / 1 worker           {second['imgs_per_sec'] / first['imgs_per_sec']:9.3f}")
        print(f"2 workers / bare loop with all cores    {second['imgs_per_sec'] / bare_all:9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

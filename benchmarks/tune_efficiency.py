"""What ASHA saves: the best fd_domain found with N trials and the trial-epochs it spent, against
a grid of the same size run to the end without early stopping.

    .venv/bin/python benchmarks/tune_efficiency.py [--params params.yaml] [--trials 4]

Both searches run the real tune stage (one TorchTrainer per trial, in-training fd_domain) on
the project's prepared data and encoder, in a scratch store. The grid is the same number of
points, log-spaced over the same ranges (sqrt(N) per axis, rounded), with ASHA's grace period
set to the full trial length so nothing stops early.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

from ganflow.config import load_config
from ganflow.tuning import run_sweep


def scratch(cfg, workdir: Path, trials: int):
    out = cfg.model_copy(deep=True)
    out._root = cfg.root
    for name in ("ray_results", "mlflow_db", "mlflow_artifacts", "tune_best"):
        setattr(out.paths, name, workdir / name)
    out.tracking.uri = None
    out.tune.num_samples = trials
    return out


def asha(cfg) -> tuple[object, float]:
    started = time.perf_counter()
    best = run_sweep(cfg)
    return best, time.perf_counter() - started


def full_grid(cfg, trials: int) -> tuple[float, int, float, int]:
    """The same budget of points on a log grid, every trial run to the end."""
    side = max(1, round(math.sqrt(trials)))
    def points(lo, hi):
        return [lo * (hi / lo) ** (i / max(1, side - 1)) for i in range(side)] if side > 1 else [math.sqrt(lo * hi)]
    grid = [(g, d) for g in points(cfg.tune.lr_g_min, cfg.tune.lr_g_max) for d in points(cfg.tune.lr_d_min, cfg.tune.lr_d_max)]
    best_fd, epochs, started = math.inf, 0, time.perf_counter()
    for lr_g, lr_d in grid:
        one = cfg.model_copy(deep=True)
        one._root = cfg.root
        eps = 1e-12  # a one-point "search" range around each grid point; no early stopping
        one.tune = cfg.tune.model_copy(update={
            "lr_g_min": lr_g, "lr_g_max": lr_g * (1 + eps), "lr_d_min": lr_d, "lr_d_max": lr_d * (1 + eps),
            "num_samples": 1, "grace_period": cfg.tune.epochs,
        })
        result = run_sweep(one)
        best_fd = min(best_fd, result.fd_domain)
        epochs += result.trial_epochs
    return best_fd, epochs, time.perf_counter() - started, len(grid)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--trials", type=int, default=4)
    args = parser.parse_args()
    cfg = load_config(args.params)
    with tempfile.TemporaryDirectory() as tmp:
        searched = scratch(cfg, Path(tmp) / "asha", args.trials)
        best, asha_wall = asha(searched)
        grid_fd, grid_epochs, grid_wall, grid_points = full_grid(scratch(cfg, Path(tmp) / "grid", args.trials), args.trials)
    print(f"\n{cfg.tune.epochs} epochs per trial, {cfg.data.image_size}px, lr ranges "
          f"lr_g [{cfg.tune.lr_g_min:g}, {cfg.tune.lr_g_max:g}], lr_d [{cfg.tune.lr_d_min:g}, {cfg.tune.lr_d_max:g}]")
    print(f"{'search':34s} {'best fd_domain':>14s} {'trial-epochs':>13s} {'wall s':>8s}")
    print(f"{'ASHA, random, ' + str(best.trials) + ' trials':34s} {best.fd_domain:14.4g} {best.trial_epochs:13d} "
          f"{asha_wall:8.0f}   ({best.stopped_early} stopped early)")
    print(f"{'grid, ' + str(grid_points) + ' points, no early stop':34s} {grid_fd:14.4g} {grid_epochs:13d} {grid_wall:8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sample quality of the training recipes, side by side, on held-out images, in one run.

    .venv/bin/python benchmarks/quality.py [--params params.yaml] [--epochs N | --budget-s S]
                                           [--epochs-for recipe=N,...] [--seeds N] [--recipes a,b] [--smoke]

Each row is one recipe of ganflow.recipes (a block of params on top of --params) trained by the
real train stage's driver (ganflow.distributed.run_training: EMA generator, best epoch by held-out
fd_domain, BatchNorm statistics recomputed) for the same number of epochs with the same fixed
learning rates (train.lr_g / train.lr_d of --params: no sweep, so the rows differ by the recipe
only), one after another on this machine. The exported generator is scored as the evaluate stage
scores it: held-out fd_domain and its ratio to the real-vs-real floor, KID, precision, recall,
class TV and reverse KL, the data-copying statistic. Rows train equal epochs (--epochs), or equal
time (--budget-s: each recipe gets the epochs of GAN steps that fit in S seconds on this machine,
timed by a probe of its own update before the row); the wall column says what each row cost. Needs the project's prepared data and encoder
(`dvc repro encoder`); --smoke: a scratch folder of its own (16 px digits, a 1-epoch encoder),
one recipe, 1 epoch, narrow networks (checks the script runs, not the figures).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _scratch import scratch, score_exported, smoke_data
from ganflow.config import load_config
from ganflow.data import PreparedDataset, class_prior
from ganflow.distributed import run_training
from ganflow.recipes import RECIPES, apply_recipe
from ganflow.train_loop import build_state, gan_step

COLUMNS = [  # (metric, header, format)
    ("fd_domain", "fd_domain", "{:9.3f}"),
    ("fd_domain_over_real", "/ real", "{:7.2f}"),
    ("kid", "KID", "{:7.3f}"),
    ("precision", "prec", "{:5.2f}"),
    ("recall", "recall", "{:6.2f}"),
    ("classes_covered", "classes", "{:7.0f}"),
    ("class_tv", "class TV", "{:8.3f}"),
    ("class_kl_reverse", "rev KL", "{:6.3f}"),
    ("class_match", "as asked", "{:8.2f}"),  # conditional rows: share drawn as the class asked
    ("copying_flagged", "copying", "{:7.0f}"),
]


def parse_epochs(text: str | None) -> dict[str, int]:
    """--epochs-for "resnet-sn-hinge-conditional=12,dcgan-bce=40" -> {recipe: epochs}."""
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        name, _, value = item.partition("=")
        if name not in RECIPES or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--epochs-for: {item!r} is not <known recipe>=<epochs >= 1>")
        out[name] = int(value)
    return out


def seconds_per_epoch(cfg, steps: int = 8) -> float:
    """Seconds one epoch of ``cfg``'s GAN updates takes here, evaluation not included: ``steps``
    updates on random images of the data's shape, timed after two warm-up updates, times the
    updates per epoch of the train split."""
    classes = class_prior(cfg)
    state = build_state(cfg, torch.device("cpu"), cfg.train.lr_g, cfg.train.lr_d, classes[1] if classes else None)
    b = cfg.train.batch_size
    real = torch.rand(b, cfg.data.channels, cfg.data.image_size, cfg.data.image_size) * 2 - 1
    labels = torch.randint(len(classes[1]), (b,)) if classes else None
    z_gen = torch.Generator().manual_seed(0)
    for i in range(steps + 2):
        if i == 2:
            started = time.perf_counter()
        gan_step(state, cfg, real, z_gen, True, labels)
    per_step = (time.perf_counter() - started) / steps
    return per_step * (len(PreparedDataset(cfg.paths.prepared, None, part="train")) // b)


def mean_row(metrics: list[dict]) -> dict:
    """The mean of each metric over the seeds (None where any seed has none)."""
    out = {}
    for key in {k for m in metrics for k in m}:
        values = [m.get(key) for m in metrics]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = sum(values) / len(values)
        elif key == "copying_flagged":
            out[key] = any(values)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--epochs", type=int, help="epochs per row (default: train.epochs)")
    parser.add_argument("--budget-s", type=float, help="equal wall clock: each row trains the epochs of GAN "
                        "updates that fit in this many seconds (probed per recipe; evaluation not counted)")
    parser.add_argument("--epochs-for", help="per-recipe epochs, e.g. resnet-sn-hinge-conditional=12 (equal wall "
                        "clock: give a slower recipe fewer epochs; the wall column says what each row cost)")
    parser.add_argument("--seeds", type=int, default=1, help="train each row with train.seed 0..N-1; the row is "
                        "the mean, 'sd' the sd of fd_domain / real over the seeds")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names (default: all)")
    parser.add_argument("--smoke", action="store_true", help="tiny: checks the script runs")
    args = parser.parse_args()
    cfg = load_config(args.params)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        print(f"error: unknown recipe {', '.join(unknown)}; known: {', '.join(RECIPES)}", file=sys.stderr)
        return 2
    try:
        epochs_for = parse_epochs(args.epochs_for)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.seeds < 1:
        print("error: --seeds must be >= 1", file=sys.stderr)
        return 2
    if args.budget_s is not None and (args.budget_s <= 0 or args.epochs):
        print("error: --budget-s must be > 0 and cannot go with --epochs", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            names, epochs_for = names[:1], {}
            cfg.train.epochs, args.epochs, args.budget_s = 1, None, 1e-3  # the probe runs; 1 epoch
            smoke_data(cfg, Path(tmp))
        elif not (cfg.paths.encoder / "encoder.json").is_file():
            print(f"error: {cfg.paths.encoder}: no encoder; run `dvc repro encoder` first", file=sys.stderr)
            return 1
        if args.epochs:
            cfg.train.epochs = args.epochs
        if args.budget_s:  # equal time: the epochs each recipe's update speed allows
            for name in names:
                if name not in epochs_for:
                    per_epoch = seconds_per_epoch(apply_recipe(cfg, name))
                    epochs_for[name] = max(1, round(args.budget_s / per_epoch))
                    print(f"{name}: {per_epoch:.2f} s per epoch of updates -> {epochs_for[name]} epochs", flush=True)
        rows = []
        for i, name in enumerate(names):
            metrics, walls = [], []
            for seed in range(args.seeds):
                row_cfg = scratch(apply_recipe(cfg, name), Path(tmp) / f"row{i}-seed{seed}")
                row_cfg.train.seed = seed
                row_cfg.train.epochs = epochs_for.get(name, cfg.train.epochs)
                started = time.perf_counter()
                run_training(row_cfg, row_cfg.train.lr_g, row_cfg.train.lr_d)
                walls.append(time.perf_counter() - started)
                metrics.append(score_exported(row_cfg))
                print(f"{name} seed {seed}: fd_domain / real {metrics[-1]['fd_domain_over_real']:.2f} "
                      f"({walls[-1]:.0f} s)", flush=True)
            ratios = [m["fd_domain_over_real"] for m in metrics]
            spread = float(np.std(ratios, ddof=1)) if len(ratios) > 1 else float("nan")
            rows.append((name, row_cfg.train.epochs, mean_row(metrics), spread, sum(walls) / len(walls)))

    print(f"\n{cfg.data.image_size}px, lr_g {cfg.train.lr_g:g}, lr_d {cfg.train.lr_d:g}, batch {cfg.train.batch_size}; "
          f"test split, real baseline fd_domain {rows[0][2]['real_fd_domain']:.3f}; {rows[0][2]['draws']:.0f} latent "
          f"draws of {rows[0][2]['sample_size']:.0f} samples; {args.seeds} seed(s) per row (mean; sd of / real over "
          f"seeds; each seed's own ratio is a mean over the latent draws); evaluation in float32")
    header = (f"{'recipe':28s} {'epochs':>6s} " + " ".join(f"{h:>{len(f.format(0))}s}" for _, h, f in COLUMNS)
              + f" {'sd':>6s} {'wall s':>7s}")
    print(header)
    for name, epochs, m, spread, wall in rows:
        cells = " ".join(f.format(m[k]) if m.get(k) is not None else f"{'-':>{len(f.format(0))}s}"
                         for k, _, f in COLUMNS)
        flag = "  COPYING" if m.get("copying_flagged") else ""
        print(f"{name:28s} {epochs:6d} {cells} {spread:6.2f} {wall:7.0f}{flag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

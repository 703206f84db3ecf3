"""Sample quality of training recipes, side by side, on one or more data sets, in one run.

    .venv/bin/python benchmarks/quality.py [--params params.yaml] [--dataset digits,digits-100,...]
                                           [--rows default,before,...] [--kimg K | --budget-s S]
                                           [--seeds N] [--smoke]

A row is either a variant of the params file (VARIANTS: "default" is the file as it is, "before"
the recipe before the budget in images shown and adaptive augmentation: 60 epochs, no
augmentation) or one recipe of ganflow.recipes (a block of params on top of it). Each is trained
by the real train stage's driver (ganflow.training.run_training: EMA generator, exported tick
chosen on the validation split) with the same fixed learning rates (train.lr_g / train.lr_d of
--params: no sweep, so the rows differ by their recipe only), one after another on this machine,
and its exported generator scored as the evaluate stage scores it: on the test split, each
figure the mean over eval.draws latent draws, fd_domain over its real baseline, KID, precision,
recall, the class figures, the copy detector. With --seeds N each row trains with train.seed
0..N-1 and prints the mean over seeds and the sd of "/ real" over seeds.

Budgets: the params' train.kimg (or the row's own, "before" 60 epochs), --kimg for every row, or
--budget-s: equal wall clock, each row gets the kimg of GAN updates that fit in S seconds on this
machine (timed by probes of each row's update, every row probed in turn before any training,
the median of 3 rounds; evaluation not counted). The wall
column says what each row cost. --dataset (benchmarks/_scratch.py DATASETS) prints one table per
data set; all but "digits" are prepared, with an encoder of their own, in a scratch folder.
--smoke: 16 px digits, a 1-epoch encoder, one row, a few steps, narrow networks (checks the
script runs, not the figures).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _scratch import DATASETS, dataset_cfg, dataset_unavailable, score_exported, scratch, smoke_data

from ganflow.artifacts import class_prior
from ganflow.config import Config, load_config
from ganflow.gan_step import amp_dtype, build_state, gan_step
from ganflow.recipes import RECIPES, apply_recipe, with_params
from ganflow.training import run_training

# rows that change the params file itself (not a ganflow.recipes block)
VARIANTS: dict[str, dict[str, object]] = {
    "default": {},  # the params as they are
    # before issue 28: a budget of 60 epochs, whatever the data's size, and no augmentation
    "before": {"train.epochs": 60, "train.augment": "none"},
    "no-ada": {"train.augment": "none"},  # the default budget without the adaptive augmentation
    "diffaugment": {"train.augment": "diffaugment"},  # every op on every image (p = 1)
    # what a user found by hand on 100 photos before issue 28 (its goal for hidden sets: do at
    # least as well): 800 epochs (56 kimg of 70 images) with every augmentation op always on
    "hand-found": {"train.epochs": 800, "train.augment": "diffaugment"},
    "lecam": {"train.lecam": 0.3},  # LeCam at StudioGAN's weight
    "bcr": {"train.consistency": 10.0},  # consistency regularisation at the bCR paper's weight
    # the mode-seeking weight on every G, as before auto turned it off for unconditional ones
    "mode-seeking": {"train.mode_seeking": 0.5},
    # the widths before model.g_width/d_width auto (the same at 32 px; at 64 px twice auto's)
    "width-64": {"model.g_width": 64, "model.d_width": 64},
    "no-color": {"train.augment_policy": "translation,cutout"},  # RGB sets without the colour jitter
    "sn": {"model.spectral_norm": True},  # spectral norm on D (no BatchNorm there), BCE and ADA kept
    # residual G and D (model.arch resnet), with and without spectral norm and the hinge loss
    "resnet": {"model.arch": "resnet"},
    "resnet-sn-hinge": {"model.arch": "resnet", "model.spectral_norm": True, "train.loss": "hinge"},
}

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
    ("diversity_over_real", "div", "{:5.2f}"),  # pairwise distance of samples / of real draws (features)
    ("copying_nn_ratio", "nn ratio", "{:8.2f}"),  # nearest training image / nearest unseen real one
    ("spectrum_gap_over_real", "spec/real", "{:9.2f}"),  # the power spectrum's gap, no encoder involved
]


def row_cfg(cfg: Config, name: str) -> Config:
    """``cfg`` with the row's variant or recipe applied."""
    return apply_recipe(cfg, name) if name in RECIPES else with_params(cfg, VARIANTS[name])


def seconds_per_kimg(cfg: Config, steps: int = 8) -> float:
    """Seconds 1,000 images of ``cfg``'s GAN updates take here, evaluation not included:
    ``steps`` updates on random images of the data's shape, timed after two warm-up updates.
    Adaptive augmentation is timed at p = 1, its most costly: a row that uses it gets at most
    its share of the budget."""
    classes = class_prior(cfg)
    state = build_state(cfg, torch.device("cpu"), cfg.train.lr_g, cfg.train.lr_d, classes[1] if classes else None)
    if state.ada is not None:  # timed at full strength: p starts at 0, where nothing is augmented
        state.ada.p = 1.0  # (64 px RGB: the probe read 2.6 s per kimg, the training's steps 3.5-5)
    b = cfg.train.batch_size
    real = torch.rand(b, cfg.data.channels, cfg.data.image_size, cfg.data.image_size) * 2 - 1
    labels = torch.randint(len(classes[1]), (b,)) if classes else None
    z_gen = torch.Generator().manual_seed(0)
    for i in range(steps + 2):
        if i == 2:
            started = time.perf_counter()
        gan_step(state, cfg, real, z_gen, True, labels)
    return (time.perf_counter() - started) / steps * 1000.0 / b


def probe_rows(cfgs: list[Config], rounds: int = 3) -> list[float]:
    """seconds_per_kimg of every row: the median of ``rounds`` probes, the rows taking turns
    within each round, so that every row is timed under the same conditions: the machine's
    speed drifts over minutes, and a later row's probe ran after trainings, beside the local
    Ray they left running."""
    times: list[list[float]] = [[] for _ in cfgs]
    for _ in range(rounds):
        for i, one in enumerate(cfgs):
            times[i].append(seconds_per_kimg(one))
    return [float(np.median(t)) for t in times]


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


def save_grid(cfg: Config, path: Path) -> None:
    """64 samples of the exported generator (fixed latent draws) as a PNG grid."""
    from PIL import Image

    from ganflow.images import make_grid
    from ganflow.sampling import sample

    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(sample(str(cfg.paths.generator), 64, seed=0), cols=8)
    Image.fromarray(grid).save(path)


def train_dtype(cfg: Config) -> str:
    dtype = amp_dtype(cfg, torch.device("cpu"))
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def budget_text(cfg: Config, kimg: float) -> str:
    """What a row trained: kimg (and the epochs it was asked for, where the row counts epochs)."""
    return f"{kimg:.1f} kimg" + (f" ({cfg.train.epochs} ep)" if cfg.train.epochs else "")


def table(dataset: str, cfg: Config, rows: list, seeds: int) -> None:
    first = rows[0][2]
    print(f"\n{dataset}: {DATASETS[dataset]}")
    print(
        f"{cfg.data.image_size}px x{cfg.data.channels}, lr_g {cfg.train.lr_g:g}, lr_d {cfg.train.lr_d:g}, batch "
        f"{cfg.train.batch_size}; test split, real baseline fd_domain {first.get('real_fd_domain', float('nan')):.3f}; "
        f"{first.get('draws', 0):.0f} latent draws of {first.get('sample_size', 0):.0f} samples; {seeds} seed(s) per "
        f"row (mean; sd of / real over seeds); training {train_dtype(cfg)}, evaluation float32"
    )
    header = (
        f"{'row':20s} {'trained':>15s} "
        + " ".join(f"{h:>{len(f.format(0))}s}" for _, h, f in COLUMNS)
        + f" {'sd':>6s} {'p end':>5s} {'wall s':>7s}"
    )
    print(header)
    for name, budget, m, spread, wall, p_end in rows:
        cells = " ".join(
            f.format(m[k]) if m.get(k) is not None else f"{'-':>{len(f.format(0))}s}" for k, _, f in COLUMNS
        )
        flag = "  COPYING" if m.get("copying_flagged") else ""
        p_cell = f"{p_end:5.2f}" if p_end is not None else f"{'-':>5s}"
        print(f"{name:20s} {budget:>15s} {cells} {spread:6.2f} {p_cell} {wall:7.0f}{flag}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dataset", default="digits", help=f"comma-separated, of: {', '.join(DATASETS)}")
    parser.add_argument(
        "--rows",
        "--recipes",
        dest="rows",
        default="default,before",
        help=f"comma-separated variants ({', '.join(VARIANTS)}) or recipes ({', '.join(RECIPES)})",
    )
    parser.add_argument("--kimg", type=float, help="every row's budget in thousands of images shown")
    parser.add_argument(
        "--budget-s",
        type=float,
        help="equal wall clock: each row trains the kimg of GAN "
        "updates that fit in this many seconds (probed per row before any training; evaluation not counted)",
    )
    parser.add_argument("--seeds", type=int, default=1, help="train each row with train.seed 0..N-1")
    parser.add_argument("--samples", type=Path, help="write a 64-sample grid of each row and seed into this folder")
    parser.add_argument("--smoke", action="store_true", help="tiny: checks the script runs")
    args = parser.parse_args()
    base = load_config(args.params)
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    datasets = [d.strip() for d in args.dataset.split(",") if d.strip()]
    unknown = [n for n in names if n not in RECIPES and n not in VARIANTS] + [d for d in datasets if d not in DATASETS]
    if unknown:
        print(
            f"error: unknown row or dataset {', '.join(unknown)}; rows: {', '.join([*VARIANTS, *RECIPES])}; "
            f"datasets: {', '.join(DATASETS)}",
            file=sys.stderr,
        )
        return 2
    missing = [why for d in datasets if (why := dataset_unavailable(d))] if not args.smoke else []
    if missing:  # before any set trains: a run over several sets would die at the first of these
        print(f"error: {'; '.join(missing)}", file=sys.stderr)
        return 2
    if args.seeds < 1 or (args.kimg is not None and args.kimg <= 0):
        print("error: --seeds must be >= 1 and --kimg > 0", file=sys.stderr)
        return 2
    if args.budget_s is not None and (args.budget_s <= 0 or args.kimg):
        print("error: --budget-s must be > 0 and cannot go with --kimg", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in datasets:
            work = Path(tmp) / dataset
            if args.smoke:
                names, cfg = names[:1], base.model_copy(deep=True)
                cfg._root, cfg._source = base.root, base._source
                cfg.train.kimg, cfg.train.epochs, cfg.train.tick_kimg, args.kimg = 0.2, None, 0.1, 0.2
                smoke_data(cfg, work)
            elif dataset == "digits" and not (base.paths.encoder / "encoder.json").is_file():
                print(f"error: {base.paths.encoder}: no encoder; run `dvc repro encoder` first", file=sys.stderr)
                return 1
            else:
                cfg = dataset_cfg(base, dataset, work)
            rows = []
            row_cfgs = [row_cfg(cfg, name) for name in names]
            # equal time: the kimg each row's update speed allows, every row probed before any
            # training. Probed before its own row, "before" read 1.25x and 1.32x slower per kimg
            # than "default" (digits, digits-100) while their trainings' steps ran at the same img/s.
            speeds = probe_rows(row_cfgs) if args.budget_s else []
            for i, name in enumerate(names):
                one = row_cfgs[i]
                if args.kimg:
                    one.train.kimg, one.train.epochs = args.kimg, None
                if args.budget_s:
                    per_kimg = speeds[i]
                    one.train.kimg, one.train.epochs = max(0.1, args.budget_s / per_kimg), None
                    print(
                        f"{dataset} {name}: {per_kimg:.2f} s per kimg of updates -> {one.train.kimg:.1f} kimg",
                        flush=True,
                    )
                metrics, walls, p_end, kimg = [], [], [], []
                for seed in range(args.seeds):
                    seeded = scratch(one, work / f"row{i}-seed{seed}")
                    seeded.train.seed = seed
                    started = time.perf_counter()
                    summary = run_training(seeded, seeded.train.lr_g, seeded.train.lr_d)
                    walls.append(time.perf_counter() - started)
                    metrics.append(score_exported(seeded))
                    if args.samples:
                        save_grid(seeded, args.samples / f"{dataset}-{name}-seed{seed}.png")
                    p_end.append(summary.final.get("augment_p"))
                    kimg.append(summary.final.get("kimg") or 0.0)
                    print(
                        f"{dataset} {name} seed {seed}: fd_domain / real {metrics[-1]['fd_domain_over_real']:.2f} "
                        f"({walls[-1]:.0f} s)",
                        flush=True,
                    )
                ratios = [m["fd_domain_over_real"] for m in metrics]
                spread = float(np.std(ratios, ddof=1)) if len(ratios) > 1 else float("nan")
                ps = [p for p in p_end if p is not None]
                rows.append(
                    (
                        name,
                        budget_text(one, float(np.mean(kimg))),
                        mean_row(metrics),
                        spread,
                        sum(walls) / len(walls),
                        float(np.mean(ps)) if ps else None,
                    )
                )
            table(dataset, cfg, rows, args.seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())

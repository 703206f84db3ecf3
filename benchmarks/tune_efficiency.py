"""Does the sweep pick rates that last? The old rule against the new one, on one sweep, in one run;
with --grid, how early a trial ranks rates as the full budget does.

    .venv/bin/python benchmarks/tune_efficiency.py [--params params.yaml] [--smoke]
    .venv/bin/python benchmarks/tune_efficiency.py --grid [--points 3] [--lr-range 1e-5,1e-2] [--seeds 2]
        [--first-seed 0] [--save grid.json] [--load grid-a.json grid-b.json ...]

Runs the real tune stage (ASHA, one TorchTrainer per trial, each trial with its own seed) on the
project's prepared data and encoder, in a scratch store. From the same trials it takes two picks:
  old: the lowest fd_domain of any trial at any epoch (what ganflow used to select);
  new: the lowest mean of the last two fd_domain among the trials that ran every epoch.
Then it trains each pick for train.epochs, as the train stage does, and scores the exported
generator on the held-out images as the evaluate stage does. Prints both rows; when the two rules
pick the same trial it says so and trains once. Needs `dvc repro encoder` first. --smoke: in a
scratch folder of its own (digits prepared at 16 px, a 1-epoch encoder), 2 trials of 2 epochs,
narrow networks, trainings of 2 epochs, then a 2x2 grid of 2-tick trials (checks the script runs,
not the figures).

--grid: the tune stage's own sweep with tune.search: grid (--points log-spaced rates per optimizer
over --lr-range, every pair) and no early stopping, each trial trained for the whole train.kimg
and evaluated every train.tick_kimg, once per seed (tune.seed 0, 1, ...). A trial's first t ticks
are what an ASHA or PBT trial of t ticks would have seen (nothing in the loop depends on the
budget), so one grid answers for every rung: per tick it prints the Spearman correlation, over
the grid's points, between fd_recent at that tick and at the end (both the mean over seeds, on
the validation split; a diverged point ranks last). Then the grid itself: each point's final
fd_recent, mean and sd over seeds. --save writes the trials (every tick's fd_domain) to a JSON
file; --load prints the tables of saved grids together, training nothing, so seeds run on
different days add up.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _scratch import score_exported, scratch, smoke_data

from ganflow.config import load_config
from ganflow.tracking import git_commit
from ganflow.training import run_training
from ganflow.tuning import run_sweep


def sweep_trials(cfg, sweep_run_id: str) -> list[dict]:
    """The rows of a sweep's trials.json artifact (ganflow.tuning.summarise)."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{cfg.paths.mlflow_db}")
    return json.loads(mlflow.artifacts.load_text(f"runs:/{sweep_run_id}/trials.json"))


def picks(cfg, sweep_run_id: str) -> dict[str, dict]:
    """The old and the new rule's trial, from the sweep's trials.json artifact."""
    trials = [t for t in sweep_trials(cfg, sweep_run_id) if t["fd_history"]]
    old = min(trials, key=lambda t: min(t["fd_history"]))
    longest = max(len(t["fd_history"]) for t in trials)
    new = min(
        (t for t in trials if len(t["fd_history"]) == longest),
        key=lambda t: sum(t["fd_history"][-2:]) / len(t["fd_history"][-2:]),
    )
    return {"old: min over epochs": old, "new: mean of last two": new}


def train_and_score(cfg, lr_g: float, lr_d: float) -> dict:
    run_training(cfg, lr_g, lr_d)
    return score_exported(cfg)


def grid_sweeps(
    cfg, workdir: Path, points: int, low: float, high: float, seeds: int, first_seed: int = 0
) -> list[list[dict]]:
    """Per seed, the trials of a full-budget grid sweep (the trials.json rows, in grid order)."""
    grid = cfg.model_copy(deep=True)
    t = grid.tune
    t.search, t.grid_points, t.scheduler = "grid", points, "asha"
    t.lr_g_min = t.lr_d_min = low
    t.lr_g_max = t.lr_d_max = high
    t.kimg, t.tick_kimg = grid.train.kimg, grid.train.tick_kimg
    t.grace_period = 10**6  # ASHA's first rung past the end: no trial is stopped
    grid.train.epochs = None
    sweeps = []
    for seed in range(first_seed, first_seed + seeds):
        t.seed = seed
        seeded = scratch(grid, workdir / f"grid-seed{seed}")
        best = run_sweep(seeded)
        sweeps.append(sorted(sweep_trials(seeded, best.sweep_run_id), key=lambda r: (r["lr_g"], r["lr_d"])))
    return sweeps


def rank_table(sweeps: list[list[dict]], tick_kimg: float) -> None:
    """Spearman, per tick, between fd_recent at that tick and at the end (means over seeds)."""
    from scipy.stats import spearmanr

    def recent(trial: dict, tick: int) -> float:
        history = trial["fd_history"][:tick]
        if len(history) < tick or not all(np.isfinite(history[-2:])):
            return float("inf")  # diverged (or stopped) before this tick: ranks last
        return float(np.mean(history[-2:]))

    ticks = max(len(trial["fd_history"]) for sweep in sweeps for trial in sweep)
    points = len(sweeps[0])
    final = [np.mean([recent(sweep[i], ticks) for sweep in sweeps]) for i in range(points)]
    # the best points at the end: whether a short trial orders rates that are all good, not only
    # good rates against rates a decade off
    top = [int(i) for i in np.argsort(final)[: max(3, (points + 1) // 2)]]
    print(f"\nrank agreement with the full budget ({ticks} ticks of {tick_kimg:g} kimg), over {points} grid points")
    print(f"{'tick':>5s} {'~kimg':>6s} {'spearman':>9s} {f'best {len(top)}':>9s}")
    for tick in range(1, ticks + 1):
        early = [np.mean([recent(sweep[i], tick) for sweep in sweeps]) for i in range(points)]
        rho = spearmanr(early, final).statistic
        rho_top = spearmanr([early[i] for i in top], [final[i] for i in top]).statistic
        print(f"{tick:5d} {tick * tick_kimg:6.1f} {rho:9.2f} {rho_top:9.2f}")
    print(
        f"\n{'lr_g':>9s} {'lr_d':>9s} {'final fd_recent':>16s}   (validation split, mean ± sd over {len(sweeps)} seeds)"
    )
    for i in range(points):
        values = [recent(sweep[i], ticks) for sweep in sweeps]
        shown = f"{np.mean(values):8.3f} ± {np.std(values, ddof=1):5.3f}" if all(np.isfinite(values)) else "diverged"
        print(f"{sweeps[0][i]['lr_g']:9.3g} {sweeps[0][i]['lr_d']:9.3g} {shown:>16s}")


def print_saved(paths: list[Path]) -> int:
    """The tables of grids saved with --save, their seeds together."""
    saved = [json.loads(path.read_text()) for path in paths]
    if len({(g["points"], tuple(g["lr_range"]), g["tick_kimg"]) for g in saved}) != 1:
        raise SystemExit("error: --load: the saved grids differ in points, range or tick length")
    for path, g in zip(paths, saved):
        print(f"{path.name}: seeds {g['seeds']}, tick_draws {g['tick_draws']}, {g['wall_s']:.0f} s, at {g['commit']}")
    rank_table([sweep for g in saved for sweep in g["sweeps"]], saved[0]["tick_kimg"])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--smoke", action="store_true", help="tiny: checks the script runs")
    parser.add_argument("--grid", action="store_true", help="the rank-agreement table of a full-budget grid")
    parser.add_argument("--points", type=int, default=3, help="--grid: rates per optimizer")
    parser.add_argument("--lr-range", default="1e-5,1e-2", help="--grid: lowest,highest rate")
    parser.add_argument("--seeds", type=int, default=2, help="--grid: sweeps, one per tune.seed")
    parser.add_argument("--first-seed", type=int, default=0, help="--grid: the first tune.seed")
    parser.add_argument("--save", type=Path, help="--grid: write the grid's trials to this JSON file")
    parser.add_argument("--load", type=Path, nargs="+", help="print the tables of grids saved with --save")
    args = parser.parse_args()
    cfg = load_config(args.params)
    if args.load:
        return print_saved(args.load)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            cfg.tune.num_samples, cfg.tune.kimg, cfg.tune.tick_kimg, cfg.tune.grace_period = 2, 2.4, 1.0, 1
            cfg.train.epochs, cfg.train.tick_kimg = 1, 1.0  # the picks' trainings
            smoke_data(cfg, Path(tmp))
        if args.grid or args.smoke:
            low, high = (float(v) for v in args.lr_range.split(","))
            grid_cfg = cfg.model_copy(deep=True)
            if args.smoke:
                grid_cfg.train.kimg, args.points, args.seeds = 2.4, 2, 1
            started = time.perf_counter()
            sweeps = grid_sweeps(grid_cfg, Path(tmp), args.points, low, high, args.seeds, args.first_seed)
            wall = time.perf_counter() - started
            rank_table(sweeps, grid_cfg.train.tick_kimg)
            print(f"grid wall time {wall:.0f} s")
            if args.smoke:  # the save/load round trip too
                args.save = Path(tmp) / "grid.json"
            if args.save:
                saved = {
                    "commit": git_commit(Path(__file__).resolve().parents[1])[:7],
                    "points": args.points,
                    "lr_range": [low, high],
                    "tick_kimg": grid_cfg.train.tick_kimg,
                    "tick_draws": grid_cfg.eval.tick_draws,
                    "seeds": list(range(args.first_seed, args.first_seed + args.seeds)),
                    "wall_s": wall,
                    "sweeps": sweeps,
                }
                args.save.write_text(json.dumps(saved, indent=1))
                if args.smoke:
                    print_saved([args.save])
            if args.grid:
                return 0
        sweep_cfg = scratch(cfg, Path(tmp) / "sweep")
        started = time.perf_counter()
        best = run_sweep(sweep_cfg)
        sweep_wall = time.perf_counter() - started
        chosen = picks(sweep_cfg, best.sweep_run_id)
        rows, scored = [], {}
        for rule, trial in chosen.items():
            key = (trial["lr_g"], trial["lr_d"])
            if key not in scored:
                scored[key] = train_and_score(scratch(cfg, Path(tmp) / f"train{len(scored)}"), *key)
            rows.append((rule, trial, scored[key]))
    budget = f"{cfg.train.epochs} epochs" if cfg.train.epochs else f"{cfg.train.kimg:g} kimg"
    print(
        f"\nsweep: {best.trials} trials x {cfg.tune.kimg:g} kimg ({best.stopped_early} stopped early), "
        f"{sweep_wall:.0f} s; each pick then trained {budget}, scored on the test split"
    )
    print(
        f"{'rule':24s} {'lr_g':>9s} {'lr_d':>9s} {'sweep score':>11s} {'fd_domain':>10s} {'/ real':>8s} "
        f"{'recall':>7s} {'copied':>10s}"
    )
    for rule, trial, m in rows:
        score = min(trial["fd_history"]) if rule.startswith("old") else trial["fd"]
        print(
            f"{rule:24s} {trial['lr_g']:9.3g} {trial['lr_d']:9.3g} {score:11.3f} {m['fd_domain']:10.3f} "
            f"{m['fd_domain_over_real']:8.2f} {m['recall']:7.2f} {m['copying_flagged']:10.0f}"
        )
    if rows[0][1] is rows[1][1] or (rows[0][1]["lr_g"], rows[0][1]["lr_d"]) == (rows[1][1]["lr_g"], rows[1][1]["lr_d"]):
        print("both rules picked the same trial")
    return 0


if __name__ == "__main__":
    sys.exit(main())

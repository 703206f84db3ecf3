"""Is the default sweep worth its cost? Its pick against the best grid point and a fixed rate, over
seeds; with --grid, how early a trial ranks rates as the full budget does.

    .venv/bin/python benchmarks/tune_efficiency.py [--params params.yaml] [--dataset digits]
        [--seeds 3] [--first-seed 0] [--best 3.16e-4,1e-2] [--fixed 2e-4] [--rows sweep,best,fixed]
        [--save FILE] [--smoke]
    .venv/bin/python benchmarks/tune_efficiency.py --grid [--points 3] [--lr-range 1e-5,1e-2] [--seeds 2]
        [--first-seed 0] [--save grid.json]
    .venv/bin/python benchmarks/tune_efficiency.py --load FILE [FILE ...]

Without --grid, per seed (tune.seed and train.seed both set to it), three results on --dataset
(benchmarks/_scratch.py DATASETS; all but "digits" prepared, with an encoder of their own, in a
scratch folder), each a full train.kimg training by the train stage's driver, its exported
generator scored on the **test** split as the evaluate stage does (eval.draws latent draws):
  sweep S O NxK + train  (--rows sweep) the tune stage's own sweep with the params' tune:
                     section, scheduler S, objective O, N trials of at most K kimg, then
                     training its pick;
  best grid point    (best) --best's rates (the digits grid's best, below, unless told);
  fixed R            (fixed) --fixed for both rates (2e-4: the DCGAN paper's).
It prints, per row, fd_domain over the real baseline as mean ± sd over the seeds, recall, how
many seeds the copy detector flagged, the sweep's kimg of trials and each row's wall time, then
the sweep's compute against one training's. --save writes the results to a JSON file.

--grid: on --dataset, the tune stage's own sweep with tune.search: grid (--points log-spaced rates per optimizer
over --lr-range, every pair) and no early stopping, each trial trained for the whole train.kimg
and evaluated every train.tick_kimg, once per seed (tune.seed 0, 1, ...). A trial's first t ticks
are what an ASHA or PBT trial of t ticks would have seen (nothing in the loop depends on the
budget), so one grid answers for every rung: per tick it prints the Spearman correlation, over
the grid's points, between fd_recent at that tick and at the end (both the mean over seeds, on
the validation split; a diverged point ranks last). Then the grid itself: each point's final
fd_recent, mean and sd over seeds. --save writes the trials (every tick's fd_domain) to a JSON
file.

--load prints the tables of files saved with --save, training nothing, so seeds run on different
days add up (comparisons of one data set are printed as one table). --smoke: in a scratch folder
of its own (digits prepared at 16 px, a 1-epoch encoder, narrow networks), one seed of the comparison's
sweep and fixed rows (best trains as fixed does) with 2 trials and 1-epoch trainings, then a 2x2
grid of 2-tick trials, each saved and loaded again (checks the script runs, not the figures).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _scratch import DATASETS, dataset_cfg, score_exported, scratch, smoke_data

from ganflow.artifacts import read_manifest
from ganflow.budget import schedule_of
from ganflow.config import load_config
from ganflow.tracking import git_commit
from ganflow.training import run_training
from ganflow.tuning import run_sweep, trial_config


def sweep_trials(cfg, sweep_run_id: str) -> list[dict]:
    """The rows of a sweep's trials.json artifact (ganflow.tuning.summarise)."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{cfg.paths.mlflow_db}")
    return json.loads(mlflow.artifacts.load_text(f"runs:/{sweep_run_id}/trials.json"))


def schedule(cfg):
    """The one-worker plan of cfg.train on the prepared train split (ganflow.budget)."""
    return schedule_of(cfg.train, read_manifest(cfg.paths.prepared)["split"]["train"], 1)


def sweep_kimg(cfg, trials: list[dict]) -> float:
    """Thousands of images the sweep's trials showed D together (each trial to its last tick)."""
    schedule_ = schedule(trial_config(cfg))
    return sum(schedule_.kimg_at(schedule_.ticks[t["epochs"] - 1]) for t in trials if t["epochs"])


# class_match: the share drawn as the class asked (conditional generators), which fd_domain does not see
KEPT = ("fd_domain", "fd_domain_over_real", "recall", "precision", "copying_flagged", "real_fd_domain", "class_match")


ROWS = ("sweep", "best", "fixed")


def train_and_score(run, lr_g: float, lr_d: float) -> tuple[float, dict]:
    """Seconds the train stage's driver took on (lr_g, lr_d), and the KEPT test-split metrics."""
    started = time.perf_counter()
    run_training(run, lr_g, lr_d)
    seconds = time.perf_counter() - started
    metrics = score_exported(run)
    return seconds, {k: metrics.get(k) for k in KEPT}


def compare_rows(
    cfg, workdir: Path, seeds: list[int], best: tuple[float, float], fixed: float, rows: tuple[str, ...] = ROWS
) -> list[dict]:
    """Per seed (tune.seed and train.seed both), up to three results, each trained train.kimg and
    scored on the test split: sweep, the params' sweep then the train stage on its pick; best, the
    best grid point; fixed, the fixed rate for both optimizers. Each with its wall time (the
    sweep's apart). The sweep's row is named by its scheduler, objective, trials and their kimg."""
    results = []
    for seed in seeds:
        seeded = cfg.model_copy(deep=True)
        seeded.tune.seed = seeded.train.seed = seed
        if "sweep" in rows:
            run = scratch(seeded, workdir / f"sweep-seed{seed}")
            started = time.perf_counter()
            pick = run_sweep(run)
            swept = time.perf_counter() - started
            trials = sweep_trials(run, pick.sweep_run_id)
            train_s, metrics = train_and_score(run, pick.lr_g, pick.lr_d)
            results.append(
                {
                    "row": f"sweep {cfg.sweep_scheduler} {pick.objective} {cfg.tune.trials}x{cfg.tune.kimg:g} + train",
                    "seed": seed,
                    "lr_g": pick.lr_g,
                    "lr_d": pick.lr_d,
                    "sweep_s": swept,
                    "train_s": train_s,
                    "sweep_kimg": sweep_kimg(run, trials),
                    "trials": pick.trials,
                    "stopped_early": pick.stopped_early,
                    **metrics,
                    # each trial's rates, ticks, objective at its last tick and whether it was the anchor
                    "trial_rows": [
                        {k: t.get(k) for k in ("lr_g", "lr_d", "epochs", "fd", "anchor", "objective_history")}
                        for t in trials
                    ],
                }
            )
            print(f"seed {seed} {results[-1]['row']}: {results[-1]}", flush=True)
        fixed_rows = {"best": ("best grid point", best), "fixed": (f"fixed {fixed:g}", (fixed, fixed))}
        for row, (lr_g, lr_d) in (fixed_rows[r] for r in ROWS[1:] if r in rows):
            run = scratch(seeded, workdir / f"{row.split()[0]}-seed{seed}")
            train_s, metrics = train_and_score(run, lr_g, lr_d)
            results.append(
                {"row": row, "seed": seed, "lr_g": lr_g, "lr_d": lr_d, "sweep_s": 0.0, "train_s": train_s} | metrics
            )
            print(f"seed {seed} {row}: {results[-1]}", flush=True)
    return results


def as_asked(results: list[dict]) -> str:
    """The mean share drawn as asked, or "-" (unconditional, or results saved before it was kept)."""
    values = [r.get("class_match") for r in results]
    return f"{np.mean(values):.2f}" if all(isinstance(v, (int, float)) for v in values) else "-"


def compare_table(dataset: str, results: list[dict], train_kimg: float) -> None:
    """Mean ± sd over seeds of each row's test-split fd_domain / real, and its costs."""
    rows = list(dict.fromkeys(r["row"] for r in results))
    seeds = sorted({r["seed"] for r in results})
    print(f"\n{dataset}: test split, mean ± sd over seeds {seeds} (sd ddof 1); wall = sweep + train per seed")
    print(
        f"{'row':34s} {'lr_g':>17s} {'lr_d':>17s} {'fd / real':>13s} {'recall':>6s} {'copying':>7s} "
        f"{'sweep kimg':>10s} {'wall s':>7s} {'as asked':>8s}"
    )
    for row in rows:
        mine = [r for r in results if r["row"] == row]
        ratio = np.array([r["fd_domain_over_real"] for r in mine], dtype=float)
        sd = np.std(ratio, ddof=1) if len(ratio) > 1 else float("nan")
        g = [r["lr_g"] for r in mine]
        d = [r["lr_d"] for r in mine]
        span = lambda v: f"{min(v):.2g}" if min(v) == max(v) else f"{min(v):.2g}..{max(v):.2g}"  # noqa: E731
        kimg = [r.get("sweep_kimg", 0.0) for r in mine]
        print(
            f"{row:34s} {span(g):>17s} {span(d):>17s} {ratio.mean():6.2f} ± {sd:4.2f} "
            f"{np.mean([r['recall'] for r in mine]):6.2f} {sum(bool(r['copying_flagged']) for r in mine):7d} "
            f"{np.mean(kimg):10.1f} {np.mean([r['sweep_s'] + r['train_s'] for r in mine]):7.0f} "
            f"{as_asked(mine):>8s}"
        )
    for row in rows:
        swept = [r for r in results if r["row"] == row and "sweep_kimg" in r]
        if not swept:
            continue
        kimg = np.mean([r["sweep_kimg"] for r in swept])
        wall = np.mean([r["sweep_s"] / r["train_s"] for r in swept])
        print(
            f"{row}: {kimg:.1f} kimg of trials = {kimg / train_kimg:.2f}x one training's {train_kimg:g} kimg "
            f"(at most {max(r['sweep_kimg'] for r in swept) / train_kimg:.2f}x); its wall time {wall:.2f}x the training's"
        )
        for r in swept:
            print(
                f"  seed {r['seed']}: picked lr_g {r['lr_g']:.3g}, lr_d {r['lr_d']:.3g} "
                f"({r['sweep_kimg'] / train_kimg:.2f}x); fd / real {r['fd_domain_over_real']:.2f}"
            )


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
    """The tables of files saved with --save: grids (their seeds together) or comparisons."""
    saved = [json.loads(path.read_text()) for path in paths]
    for path, g in zip(paths, saved):
        print(f"{path.name}: seeds {g['seeds']}, tick_draws {g['tick_draws']}, {g['wall_s']:.0f} s, at {g['commit']}")
    grids = [g for g in saved if "sweeps" in g]
    if len({(g.get("dataset", "digits"), g["points"], tuple(g["lr_range"]), g["tick_kimg"]) for g in grids}) > 1:
        raise SystemExit("error: --load: the saved grids differ in data set, points, range or tick length")
    if grids:
        rank_table([sweep for g in grids for sweep in g["sweeps"]], grids[0]["tick_kimg"])
    merged: dict[str, list[dict]] = {}  # comparisons of one data set, run on different days, together
    for g in saved:
        if "results" in g:
            merged.setdefault(g["dataset"], []).extend(g["results"])
    for dataset, results in merged.items():
        compare_table(dataset, results, next(g["train_kimg"] for g in saved if g.get("dataset") == dataset))
    return 0


def saved_header(cfg, seeds: list[int], wall: float) -> dict:
    return {
        "commit": git_commit(Path(__file__).resolve().parents[1])[:7],
        "tick_draws": cfg.eval.tick_draws,
        "seeds": seeds,
        "wall_s": wall,
    }


def pair(text: str) -> tuple[float, float]:
    lr_g, lr_d = (float(v) for v in text.split(","))
    return lr_g, lr_d


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--smoke", action="store_true", help="tiny: checks the script runs")
    parser.add_argument("--dataset", default="digits", choices=list(DATASETS), help="the comparison's data set")
    parser.add_argument("--best", type=pair, default=(3.16e-4, 1e-2), help="the best grid point: lr_g,lr_d")
    parser.add_argument("--fixed", type=float, default=2e-4, help="the fixed rate of both optimizers")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"the comparison's rows, of: {', '.join(ROWS)}")
    parser.add_argument("--grid", action="store_true", help="the rank-agreement table of a full-budget grid")
    parser.add_argument("--points", type=int, default=3, help="--grid: rates per optimizer")
    parser.add_argument("--lr-range", default="1e-5,1e-2", help="--grid: lowest,highest rate")
    parser.add_argument("--seeds", type=int, help="seeds (tune.seed, and train.seed): 3, or 2 with --grid")
    parser.add_argument("--first-seed", type=int, default=0, help="the first seed")
    parser.add_argument("--save", type=Path, help="write the results to this JSON file")
    parser.add_argument("--load", type=Path, nargs="+", help="print the tables of files saved with --save")
    args = parser.parse_args()
    cfg = load_config(args.params)
    if args.load:
        return print_saved(args.load)
    seeds = list(range(args.first_seed, args.first_seed + (args.seeds or (2 if args.grid else 3))))
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            cfg.tune.num_samples, cfg.tune.kimg, cfg.tune.tick_kimg, cfg.tune.grace_period = 2, 2.4, 1.0, 1
            cfg.train.epochs, cfg.train.tick_kimg = 1, 1.0
            smoke_data(cfg, Path(tmp))
            seeds, args.save = seeds[:1], Path(tmp) / "compare.json"
            if args.rows == ",".join(ROWS):  # "best" is "fixed" at other rates: one training less
                args.rows = "sweep,fixed"
        if not args.grid:
            data_cfg = cfg if args.smoke else dataset_cfg(cfg, args.dataset, Path(tmp) / args.dataset)
            started = time.perf_counter()
            rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
            if not rows or set(rows) - set(ROWS):
                raise SystemExit(f"error: --rows: use a comma-separated list of {', '.join(ROWS)}")
            results = compare_rows(data_cfg, Path(tmp), seeds, args.best, args.fixed, rows)
            wall = time.perf_counter() - started
            train_kimg = schedule(data_cfg).kimg
            compare_table(args.dataset, results, train_kimg)
            print(f"wall time {wall:.0f} s")
            if args.save:
                saved = saved_header(data_cfg, seeds, wall) | {
                    "dataset": args.dataset,
                    "train_kimg": train_kimg,
                    "tune": data_cfg.tune.model_dump(),
                    "results": results,
                }
                args.save.write_text(json.dumps(saved, indent=1, default=str))
            if not args.smoke:
                return 0
            print_saved([args.save])
            args.save = Path(tmp) / "grid.json"
        low, high = (float(v) for v in args.lr_range.split(","))
        grid_cfg = cfg.model_copy(deep=True)
        if not args.smoke:
            grid_cfg = dataset_cfg(grid_cfg, args.dataset, Path(tmp) / args.dataset)
        if args.smoke:
            grid_cfg.train.kimg, grid_cfg.train.epochs, args.points = 2.4, None, 2
        started = time.perf_counter()
        sweeps = grid_sweeps(grid_cfg, Path(tmp), args.points, low, high, len(seeds), seeds[0])
        wall = time.perf_counter() - started
        rank_table(sweeps, grid_cfg.train.tick_kimg)
        print(f"grid wall time {wall:.0f} s")
        if args.save:
            saved = saved_header(grid_cfg, seeds, wall) | {
                "dataset": "digits" if args.smoke else args.dataset,
                "points": args.points,
                "lr_range": [low, high],
                "tick_kimg": grid_cfg.train.tick_kimg,
                "sweeps": sweeps,
            }
            args.save.write_text(json.dumps(saved, indent=1))
            if args.smoke:
                print_saved([args.save])
    return 0


if __name__ == "__main__":
    sys.exit(main())

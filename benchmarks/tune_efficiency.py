"""Does the sweep pick rates that last? The old rule against the new one, on one sweep, in one run.

    .venv/bin/python benchmarks/tune_efficiency.py [--params params.yaml] [--smoke]

Runs the real tune stage (ASHA, one TorchTrainer per trial, each trial with its own seed) on the
project's prepared data and encoder, in a scratch store. From the same trials it takes two picks:
  old: the lowest fd_domain of any trial at any epoch (what ganflow used to select);
  new: the lowest mean of the last two fd_domain among the trials that ran every epoch.
Then it trains each pick for train.epochs, as the train stage does, and scores the exported
generator on the held-out images as the evaluate stage does. Prints both rows; when the two rules
pick the same trial it says so and trains once. Needs `dvc repro encoder` first. --smoke: in a
scratch folder of its own (digits prepared at 16 px, a 1-epoch encoder), 2 trials of 2 epochs,
narrow networks, trainings of 2 epochs (checks the script runs, not the figures).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _scratch import score_exported, scratch, smoke_data

from ganflow.config import load_config
from ganflow.training import run_training
from ganflow.tuning import run_sweep


def picks(cfg, sweep_run_id: str) -> dict[str, dict]:
    """The old and the new rule's trial, from the sweep's trials.json artifact."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{cfg.paths.mlflow_db}")
    trials = [t for t in json.loads(mlflow.artifacts.load_text(f"runs:/{sweep_run_id}/trials.json")) if t["fd_history"]]
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--smoke", action="store_true", help="tiny: checks the script runs")
    args = parser.parse_args()
    cfg = load_config(args.params)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            cfg.tune.num_samples, cfg.tune.kimg, cfg.tune.tick_kimg, cfg.tune.grace_period = 2, 2.4, 1.0, 1
            cfg.train.epochs, cfg.train.tick_kimg = 2, 1.0
            smoke_data(cfg, Path(tmp))
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

"""DVC stage `tune`: Ray Tune search of (lr_g, lr_d) by in-training validation fd_domain (the mean of
a trial's last two evaluations), ASHA early stopping;
writes paths.tune_best (tune/best.json), which the train stage reads. Never edits params.yaml.

    python pipelines/tune.py [--params params.yaml]

With cluster.address set, the stage runs as a Ray job on that cluster (ganflow/jobs.py).
"""

from __future__ import annotations

import sys

from ganflow.artifacts import write_best
from ganflow.config import Config
from ganflow.jobs import run_stage
from ganflow.stage import stage_main
from ganflow.tuning import run_sweep


def tune(cfg: Config) -> None:
    best = run_sweep(cfg)
    write_best(cfg, best)
    if not best.tuned:
        print(f"tune.enabled is false: train.lr_g={best.lr_g:g}, train.lr_d={best.lr_d:g} -> {cfg.paths.tune_best}")
        return
    print(
        f"best of {best.trials} trials ({best.stopped_early} stopped early, {best.trial_ticks} trial ticks of {cfg.tune.tick_kimg:g} kimg): "
        f"lr_g={best.lr_g:.3g} lr_d={best.lr_d:.3g}, fd_recent {best.fd_domain:.3f} (mean validation "
        f"{best.objective} of its last two ticks, to tick {best.epoch}); "
        f"MLflow sweep run {best.sweep_run_id} -> {cfg.paths.tune_best}"
    )


def stage(cfg: Config) -> None:
    if not cfg.tune.enabled:
        tune(cfg)  # passing train.lr_* through needs no cluster
    else:
        run_stage(cfg, "tune", tune)


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, stage, argv)


if __name__ == "__main__":
    sys.exit(main())

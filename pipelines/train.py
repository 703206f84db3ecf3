"""DVC stage `train`: Ray Train DDP training of the GAN; exports the EMA generator to paths.generator.

    python pipelines/train.py [--params params.yaml]

Learning rates come from paths.tune_best (the tune stage's output). Writes paths.generator
(generator.safetensors + generator.json), metrics/train.json and plots/train.csv, and logs the run
(params, metrics, sample grids, model) to MLflow. With cluster.address set, the stage runs as a
Ray job on that cluster and its outputs are brought back here (ganflow/jobs.py).
"""

from __future__ import annotations

import sys

from ganflow.artifacts import read_best
from ganflow.config import Config
from ganflow.jobs import run_stage
from ganflow.stage import stage_main
from ganflow.training import run_training


def train(cfg: Config) -> None:
    lr_g, lr_d = read_best(cfg)  # tune/best.json: the sweep's winner, or train.lr_* passed through
    summary = run_training(cfg, lr_g, lr_d)
    for cause in summary.restarts:
        print(f"worker restarted from its last checkpoint after: {cause}")
    best = f"fd_domain {summary.best_fd:.3f}" if summary.best_fd is not None else "not evaluated"
    kimg = {r.get("epoch"): r.get("kimg") for r in summary.history}
    p = summary.final.get("augment_p")
    ada = f"; augmentation p {p:.2f} at the end" if p is not None else ""
    print(
        f"trained {kimg.get(summary.epochs, 0) or 0:g} kimg ({summary.epochs} epochs){ada}; exported the EMA "
        f"generator of kimg {kimg.get(summary.best_epoch) or 0:g} ({best}, validation; the best tick from "
        f"{cfg.train.export_from:.0%} of the budget on) -> {cfg.paths.generator}; "
        f"MLflow run {summary.run_id}"
    )


def stage(cfg: Config) -> None:
    run_stage(cfg, "train", train)


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, stage, argv)


if __name__ == "__main__":
    sys.exit(main())

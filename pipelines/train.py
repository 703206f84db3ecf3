"""DVC stage `train`: Ray Train DDP training of the GAN; exports the EMA generator to paths.generator.

    python pipelines/train.py [--params params.yaml]

Writes paths.generator (generator.safetensors + generator.json), metrics/train.json and
plots/train.csv, and logs the run (params, metrics, sample grids, model) to MLflow.
"""

from __future__ import annotations

import sys

from ganflow.cli import stage_main
from ganflow.config import Config
from ganflow.distributed import run_training


def stage(cfg: Config) -> None:
    summary = run_training(cfg, cfg.train.lr_g, cfg.train.lr_d)
    final = summary.final
    print(
        f"trained {summary.epochs} epochs (loss_d {final['loss_d']:.3f}, loss_g {final['loss_g']:.3f}); "
        f"generator -> {cfg.paths.generator}; MLflow run {summary.run_id}"
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, stage, argv)


if __name__ == "__main__":
    sys.exit(main())

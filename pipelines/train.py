"""DVC stage `train`: Ray Train DDP training of the GAN; exports the EMA generator to paths.generator.

    python pipelines/train.py [--params params.yaml]

Writes paths.generator (generator.safetensors + generator.json), metrics/train.json and
plots/train.csv, and logs the run (params, metrics, sample grids, model) to MLflow.
"""

from __future__ import annotations

import argparse
import sys

from ganflow.cli import run_main
from ganflow.config import DEFAULT_PARAMS, load_config
from ganflow.distributed import run_training


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    args = parser.parse_args(argv)

    def stage() -> None:
        cfg = load_config(args.params)
        summary = run_training(cfg, cfg.train.lr_g, cfg.train.lr_d)
        final = summary.final
        print(
            f"trained {summary.epochs} epochs (loss_d {final['loss_d']:.3f}, loss_g {final['loss_g']:.3f}); "
            f"generator -> {cfg.paths.generator}; MLflow run {summary.run_id}"
        )

    return run_main(stage)


if __name__ == "__main__":
    sys.exit(main())

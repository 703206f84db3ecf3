"""DVC stage `encoder`: fit the evaluation encoder on the train split; store it with the
validation reference features and the train features in paths.encoder (the test split is not read).

    python pipelines/encoder.py [--params params.yaml]
"""

from __future__ import annotations

import json
import sys

from ganflow.atomic import write_file
from ganflow.config import Config
from ganflow.encoder import fit_encoder
from ganflow.stage import stage_main


def stage(cfg: Config) -> None:
    metrics = fit_encoder(cfg)
    write_file(cfg.paths.metrics / "encoder.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    quality = (
        f"validation accuracy {metrics['validation_accuracy']:.3f}"
        if "validation_accuracy" in metrics
        else f"validation reconstruction MSE {metrics['validation_reconstruction_mse']:.4f}"
    )
    print(
        f"fitted a {metrics['kind']} encoder on {metrics['train_count']} train images ({quality}, "
        f"{metrics['validation_count']} validation images) -> {cfg.paths.encoder}"
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, stage, argv)


if __name__ == "__main__":
    sys.exit(main())

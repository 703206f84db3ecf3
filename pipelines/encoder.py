"""DVC stage `encoder`: fit the evaluation encoder on the prepared data; store it with the real
reference features and the real-vs-real floor of every metric in paths.encoder.

    python pipelines/encoder.py [--params params.yaml]
"""

from __future__ import annotations

import json
import sys

from ganflow.atomic import write_file
from ganflow.stage import stage_main
from ganflow.config import Config
from ganflow.evaluation import fit_encoder


def stage(cfg: Config) -> None:
    metrics = fit_encoder(cfg)
    write_file(cfg.paths.metrics / "encoder.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    quality = (
        f"held-out accuracy {metrics['heldout_accuracy']:.3f}" if "heldout_accuracy" in metrics
        else f"held-out reconstruction MSE {metrics['heldout_reconstruction_mse']:.4f}"
    )
    print(
        f"fitted a {metrics['kind']} encoder ({quality}); real-vs-real floor of fd_domain "
        f"{metrics['floor_fd_domain']:.3f} at {metrics['sample_size']} samples -> {cfg.paths.encoder}"
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, stage, argv)


if __name__ == "__main__":
    sys.exit(main())

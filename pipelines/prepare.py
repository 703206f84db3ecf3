"""DVC stage `prepare`: read data.source and write the prepared dataset to paths.prepared.

    python pipelines/prepare.py [--params params.yaml]

An image folder is decoded in parallel: by processes on this machine's cores, or by Ray tasks
over the cluster's nodes when the stage runs on a Ray cluster (RAY_ADDRESS set). With
cluster.address set, the stage runs as a Ray job on that cluster (data.path must then be a path
every node sees) and its output is brought back here (ganflow/jobs.py).
"""

from __future__ import annotations

import sys

from ganflow.config import Config
from ganflow.data import prepare
from ganflow.jobs import run_stage
from ganflow.stage import stage_main


def prepare_here(cfg: Config) -> None:
    summary = prepare(cfg)
    h, w, c = summary.shape
    classes = f"{len(summary.class_names)} classes" if summary.class_names else "unlabelled"
    skipped = f", {summary.skipped} files skipped (see manifest.json)" if summary.skipped else ""
    print(f"prepared {summary.count} images ({h}x{w}x{c}, {classes}{skipped}) -> {summary.path}")


def stage(cfg: Config) -> None:
    run_stage(cfg, "prepare", prepare_here)


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, stage, argv)


if __name__ == "__main__":
    sys.exit(main())

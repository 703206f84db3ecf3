"""DVC stage `prepare`: read data.source and write the prepared dataset to paths.prepared.

    python pipelines/prepare.py [--params params.yaml]
"""

from __future__ import annotations

import sys

from ganflow.stage import stage_main
from ganflow.config import Config
from ganflow.data import prepare


def stage(cfg: Config) -> None:
    summary = prepare(cfg)
    h, w, c = summary.shape
    classes = f"{len(summary.class_names)} classes" if summary.class_names else "unlabelled"
    skipped = f", {summary.skipped} files skipped (see manifest.json)" if summary.skipped else ""
    print(f"prepared {summary.count} images ({h}x{w}x{c}, {classes}{skipped}) -> {summary.path}")


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, stage, argv)


if __name__ == "__main__":
    sys.exit(main())

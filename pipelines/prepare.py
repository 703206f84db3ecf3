"""DVC stage `prepare`: read data.source and write the prepared dataset to paths.prepared.

    python pipelines/prepare.py [--params params.yaml]
"""

from __future__ import annotations

import argparse
import sys

from ganflow.cli import run_main
from ganflow.config import DEFAULT_PARAMS, load_config
from ganflow.data import prepare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    args = parser.parse_args(argv)

    def stage() -> None:
        cfg = load_config(args.params)
        summary = prepare(cfg)
        h, w, c = summary.shape
        classes = f"{len(summary.class_names)} classes" if summary.class_names else "unlabelled"
        skipped = f", {summary.skipped} files skipped (see manifest.json)" if summary.skipped else ""
        print(f"prepared {summary.count} images ({h}x{w}x{c}, {classes}{skipped}) -> {summary.path}")

    return run_main(stage)


if __name__ == "__main__":
    sys.exit(main())

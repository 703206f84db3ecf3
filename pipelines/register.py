"""DVC stage `register`: register paths.generator in the MLflow model registry as
registry.model_name; alias `challenger` on the new version, `champion` only if its fd_domain
beats the current champion's. Writes paths.registry (registry/model_version.json).

    python pipelines/register.py [--params params.yaml]
"""

from __future__ import annotations

import sys

from ganflow.cli import stage_main
from ganflow.config import Config
from ganflow.registry import register


def stage(cfg: Config) -> None:
    record = register(cfg)
    if record["copying_flagged"]:
        verdict = "challenger only: the data-copying test flagged it (copying_ct in metrics/eval.json)"
    elif record["promoted"]:
        verdict = "promoted to champion"
    elif "champion" in record["aliases"]:
        verdict = "already the champion"
    else:
        verdict = f"challenger only (the champion's fd_domain is {record['champion_fd_domain_before']:.4g})"
    again = "" if record["created"] else " (already registered: same weights)"
    print(
        f"{record['name']} version {record['version']}{again}: fd_domain {record['fd_domain']:.4g}, {verdict}; "
        f"aliases {', '.join(record['aliases'])} -> {cfg.paths.registry}"
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, stage, argv)


if __name__ == "__main__":
    sys.exit(main())

"""DVC stage `register`: register paths.generator in the MLflow model registry as
registry.model_name; alias `challenger` on the new version, `champion` on the best version
measured with the same encoder and held-out set (see ganflow/registry.py). Writes
paths.registry (registry/model_version.json).

    python pipelines/register.py [--params params.yaml]
"""

from __future__ import annotations

import sys

from ganflow.stage import stage_main
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
    elif record["champion_version"] is not None:
        verdict = (f"challenger only (champion: version {record['champion_version']}, fd_domain "
                   f"{record['champion_fd_domain']:.4g}, measured the same way)")
    else:
        verdict = "challenger only (every version measured this way is flagged by the data-copying test)"
    again = "" if record["created"] else " (already registered: same weights)"
    print(
        f"{record['name']} version {record['version']}{again}: fd_domain {record['fd_domain']:.4g}, {verdict}; "
        f"aliases {', '.join(record['aliases'])} -> {cfg.paths.registry}"
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, stage, argv)


if __name__ == "__main__":
    sys.exit(main())
